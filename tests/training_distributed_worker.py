"""Run by tests/test_training_distributed.py under torchrun (2 gloo processes): the distributed pieces of
optvq_hf.training on uneven shards, compared on rank 0 with one process on all the data."""

import json
import sys

import torch
import torch.distributed as dist

from optvq_hf import OptVQConfig, OptVQModel
from optvq_hf.training import (
    RunningMeans, diagnose_divergence, divergence_signal, evaluate_reconstruction, initialize_codebook,
    reduce_divergence_signal,
)

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
alone = dist.new_group([0])  # rank 0 by itself: the one-process reference runs
config = OptVQConfig.from_preset("optvq-mnist", codebook_size=16, base_channels=8, latent_channels=8)
images = (torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1)
batches = [images[:1], images[1:2], images[2:3], images[3:4], images[4:5]]
mine = batches[:3] if rank == 0 else batches[3:]  # uneven: 3 batches on rank 0, 2 on rank 1
result = {}

# k-means initialization: rows gathered in rank order, codes broadcast from rank 0.
torch.manual_seed(0)
model = OptVQModel(config)
if rank == 1:  # a replica that drifted: the broadcast must overwrite it
    with torch.no_grad():
        for parameter in model.quantizer.parameters():
            parameter.add_(1.0)
rows = initialize_codebook(model, mine, "kmeans", num_iters=5, seed=3)
codebooks = [torch.empty_like(model.get_codebook()) for _ in range(world)]
dist.all_gather(codebooks, model.get_codebook().contiguous())
quantizer_state = torch.cat([p.detach().flatten() for p in model.quantizer.parameters()])
states = [torch.empty_like(quantizer_state) for _ in range(world)]
dist.all_gather(states, quantizer_state)
if rank == 0:
    torch.manual_seed(0)
    single = OptVQModel(config)
    result["rows"] = [rows, initialize_codebook(single, batches, "kmeans", num_iters=5, seed=3, process_group=alone)]
    result["replicas_equal"] = torch.equal(codebooks[0], codebooks[1]) and torch.equal(states[0], states[1])
    result["equals_one_process"] = torch.equal(codebooks[0], single.get_codebook())
    untouched = OptVQModel(config)
    result["codebook_changed"] = not torch.allclose(untouched.get_codebook(), single.get_codebook())

# Evaluation: images r, r + 2, ... on rank r (3 and 2 images), reduced on every rank.
eval_images = ((images + 1) * 127.5).round().to(torch.uint8)
metrics, counts = evaluate_reconstruction(model, eval_images, batch_size=2)
gathered = [None] * world
dist.all_gather_object(gathered, metrics)
if rank == 0:
    single_metrics, single_counts = evaluate_reconstruction(model, eval_images, batch_size=2, process_group=alone)
    result["eval_same_on_ranks"] = gathered[0] == gathered[1]
    result["eval"] = [metrics, single_metrics]
    result["eval_counts_equal"] = torch.equal(counts, single_counts)

# Running means of named scalars over uneven windows: 2 values on rank 0, 1 on rank 1.
means = RunningMeans()
for value in ([1.0, 2.0] if rank == 0 else [6.0]):
    means.add({"loss": torch.tensor(value), "l1": value / 2})
result_means = means.compute()
gathered = [None] * world
dist.all_gather_object(gathered, result_means)
if rank == 0:
    result["means"] = gathered

# Divergence: only one rank sees it (step 1: rank 1's latents are NaN; step 2: rank 0's loss is Inf; step 3: rank 1's
# forward failed; step 4: rank 0's latents are 120 times the codebook's largest coordinate, rank 1's 2 times); the
# reduced signal gives every rank the same verdict. Step 0: both healthy. The codebook is the same on both ranks.
codebook = torch.tensor([[0.5, -0.25], [0.1, 0.2]])
verdicts = []
for step, (loss, latents) in enumerate([
    (torch.tensor(1.0), torch.full((2, 3), 2.0 + rank)),
    (torch.tensor(1.0), torch.full((2, 3), float("nan") if rank == 1 else 5.0)),
    (torch.tensor(float("inf") if rank == 0 else 1.0), torch.ones(2, 3)),
    (None if rank == 1 else torch.tensor(1.0), None if rank == 1 else torch.ones(2, 3)),
    (torch.tensor(1.0), torch.full((2, 3), 60.0 if rank == 0 else 1.0)),
]):
    signal = reduce_divergence_signal(divergence_signal(loss, latents, codebook=codebook)).tolist()
    verdict = diagnose_divergence(signal[0] == 0, signal[1], step, forward_failed=signal[0] == 2,
                                  latent_codebook_ratio=signal[2])
    verdicts.append([signal, verdict.diverged, verdict.reasons])
gathered = [None] * world
dist.all_gather_object(gathered, verdicts)
if rank == 0:
    result["divergence"] = gathered
    with open(sys.argv[1], "w") as handle:
        json.dump(result, handle)
dist.destroy_process_group()
