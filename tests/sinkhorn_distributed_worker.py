"""Run by tests/test_sinkhorn_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Every rank takes its own, unevenly sized slice of one seeded global batch, assigns it with the global Sinkhorn
(`process_group="world"`, and through `OptVQQuantizer` in training mode), gathers all ranks' ids, and rank 0 compares
them with one process on the concatenated batch. The soft plan (`sinkhorn_plan`, OT-VAE's targets, and its
`sinkhorn_plan_potentials`) is checked the same way, and `OTVAEQuantizer` for its training / eval / `process_group` behaviour. Results go to the JSON file named by
argv[1].
"""

import json
import sys

import torch
import torch.distributed as dist

from optvq_hf import OptVQQuantizer, OTVAEQuantizer
from optvq_hf.sinkhorn import sinkhorn_assign, sinkhorn_plan, sinkhorn_plan_potentials


def gather_ids(local_ids: torch.Tensor) -> torch.Tensor:
    """All ranks' rows (of any shape), concatenated in rank order."""
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([local_ids.shape[0]]))
    largest = int(max(sizes))
    padded = torch.full((largest, *local_ids.shape[1:]), -1, dtype=local_ids.dtype)
    padded[: local_ids.shape[0]] = local_ids
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(n)] for g, n in zip(gathered, sizes)])


def global_batch(name, split, codes, dim, rank):
    """A seeded global batch of `sum(split)` rows, a codebook, and this rank's slice of the rows. In a case named
    "..._ranks_differ" rank 1's rows lie farther from the codes and spread wider than rank 0's: the ranks' moments of
    the distances (count, mean, second moment, pivot) all differ, so only their exact combination gives the global
    ones."""
    generator = torch.Generator().manual_seed(len(name) * 1000 + codes)
    features = torch.randn(sum(split), dim, generator=generator) * 2.0 + 0.5
    codebook = torch.randn(codes, dim, generator=generator)
    if name.endswith("_ranks_differ"):
        features[: split[0]] = features[: split[0]] * 0.25
        features[split[0] :] = features[split[0] :] * 1.5 + 3.0
    start = sum(split[:rank])
    return features, codebook, features[start : start + split[rank]]


def soft_plan_cases(rank, results):
    """The soft plan of the global batch: each rank gets its rows of what one process computes on all of them."""
    cases = {
        # name: (rows per rank, codes, dim, normalization, epsilon); "exact": the kernel underflows, exact passes
        "plan_all": ((300, 137), 64, 8, "all", 10.0),
        "plan_dim": ((90, 160), 48, 4, "dim", 3.0),
        "plan_exact": ((120, 80), 32, 2, "all", 1e3),
        "plan_empty_rank": ((0, 90), 24, 4, "all", 10.0),
        # a rank without rows on the fixed-scale normalizations (no pass 0 there) and on the exact passes
        "plan_dim_empty_rank": ((0, 90), 24, 4, "dim", 3.0),
        "plan_none_empty_rank": ((0, 90), 24, 3, "none", 3.0),
        "plan_exact_empty_rank": ((0, 120), 32, 2, "all", 1e3),
        "plan_ranks_differ": ((70, 190), 24, 4, "all", 10.0),
    }
    for name, (split, codes, dim, normalization, epsilon) in cases.items():
        features, codebook, local = global_batch(name, split, codes, dim, rank)
        plan = sinkhorn_plan(local, codebook, epsilon, 5, normalization, process_group="world", block_size=37)
        gathered = gather_ids(plan)
        # default block rows, which differ between uneven ranks (so does the kernel's headroom sigma)
        default_blocks = gather_ids(sinkhorn_plan(local, codebook, epsilon, 5, normalization, process_group="world"))
        # the same plan from its potentials (OT-VAE's training pass rebuilds its rows from them)
        potentials = sinkhorn_plan_potentials(local, codebook, epsilon, 5, normalization, process_group="world")
        rebuilt = gather_ids(torch.softmax(-potentials.distance_scale * torch.cdist(local.double(), codebook.double())
                                           + potentials.code_potentials, dim=1))
        if rank == 0:
            single = sinkhorn_plan(features, codebook, epsilon, 5, normalization)
            local_only = sinkhorn_plan(features[: split[0]], codebook, epsilon, 5, normalization)
            results[name] = {
                "rows": [int(gathered.shape[0]), int(default_blocks.shape[0]), int(single.shape[0])],
                "max_error": float((gathered - single).abs().max()),
                "potentials_error": float((rebuilt - single.double()).abs().max()),
                "default_blocks_error": float((default_blocks - single).abs().max()),
                "local_differs": bool(split[0] == 0 or (gathered[: split[0]] - local_only).abs().max() > 1e-3),
            }


def float64_cases(rank, results):
    """float64 inputs: magnitudes beyond float32's range are rescaled by one power of two agreed over the ranks (the
    largest magnitude of all ranks), so two ranks equal one process; with "dim" (whose scale matters) a magnitude that
    only one rank holds is refused on every rank alike."""
    split = (70, 110)
    features, codebook, local = global_batch("float64", split, 16, 4, rank)
    features, codebook = features.double() * 1e-45, codebook.double() * 1e-45  # float32 would flush them to 0
    local = features[sum(split[:rank]) : sum(split[: rank + 1])]
    ids = gather_ids(sinkhorn_assign(local, codebook, process_group="world"))
    plan = gather_ids(sinkhorn_plan(local, codebook, process_group="world"))
    # rank 0's rows alone lie beyond 2^60 (float32 holds them, but the engine refuses such float64 inputs for "dim")
    refused_rows = local * 1e45 * (1e19 if rank == 0 else 1.0)
    try:
        sinkhorn_assign(refused_rows, codebook * 1e45, normalization="dim", process_group="world")
        refused = False
    except ValueError as error:
        refused = "outside float32's range" in str(error)
    refusals = gather_ids(torch.tensor([int(refused)]))
    # float32 rows whose magnitudes differ by 1e20 between the ranks: one power-of-two scale for all (the largest
    # rank's), so no square overflows on the rank with the large rows
    mixed = torch.cat([features[: split[0]] * 1e65, features[split[0] :] * 1e45]).float()
    unit_codes = (codebook * 1e45).float()
    mixed_ids = gather_ids(sinkhorn_assign(mixed[sum(split[:rank]) : sum(split[: rank + 1])], unit_codes,
                                           normalization="dim", process_group="world"))
    if rank == 0:
        results["float64"] = {
            "mismatches": int((ids != sinkhorn_assign(features, codebook)).sum()),
            "max_error": float((plan - sinkhorn_plan(features, codebook)).abs().max()),
            "distinct_codes": int(ids.unique().numel()),
            "refused_on": refusals.tolist(),
            "mixed_mismatches": int((mixed_ids != sinkhorn_assign(mixed, unit_codes, normalization="dim")).sum()),
        }


def otvae_cases(rank, results):
    """OTVAEQuantizer's targets: the global batch in training, its own `process_group`, and no collective in eval."""
    torch.manual_seed(0)
    quantizer = OTVAEQuantizer(dim=8, codebook_size=32, num_heads=2).train()
    rows = torch.randn(2 * 150, 4, generator=torch.Generator().manual_seed(3))
    local = rows[rank * 150 : (rank + 1) * 150]
    codebook = quantizer.codebook.detach()
    synced = gather_ids(quantizer.targets(local, codebook))
    own_group = [dist.new_group([0]), dist.new_group([1])][rank]
    quantizer.process_group = own_group  # a group of this rank alone: its own rows
    grouped = quantizer.targets(local, codebook)
    quantizer.process_group = None
    if rank == 0:
        evaluated = quantizer.eval().targets(local, codebook)  # rank 1 does not take part: no collective in eval
        joint = sinkhorn_plan(rows, codebook, quantizer.epsilon, quantizer.num_iters, quantizer.normalization)
        own = sinkhorn_plan(local, codebook, quantizer.epsilon, quantizer.num_iters, quantizer.normalization)
        results["otvae"] = {
            "synced_error": float((synced - joint).abs().max()),
            "group_error": float((grouped - own).abs().max()),
            "eval_error": float((evaluated - own).abs().max()),
            "local_differs": float((own - joint[:150]).abs().max()) > 1e-3,
        }


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    cases = {
        # name: (rows per rank, codes, dim, normalization, streaming)
        "all_uneven": ((300, 137), 64, 8, "all", False),
        "all_streaming": ((150, 250), 96, 16, "all", True),
        "dim": ((200, 200), 48, 4, "dim", "auto"),
        "none": ((100, 180), 32, 3, "none", False),
        "empty_rank": ((0, 120), 40, 4, "all", False),
        "all_ranks_differ": ((90, 230), 32, 4, "all", False),
    }
    for name, (split, codes, dim, normalization, streaming) in cases.items():
        features, codebook, local = global_batch(name, split, codes, dim, rank)
        ids = sinkhorn_assign(
            local, codebook, normalization=normalization, process_group="world", streaming=streaming, block_size=37
        )
        gathered = gather_ids(ids)
        # the default block rows, which differ between uneven ranks
        default_blocks = gather_ids(sinkhorn_assign(local, codebook, normalization=normalization, process_group="world",
                                                    streaming=streaming))
        if rank == 0:
            single = sinkhorn_assign(features, codebook, normalization=normalization)
            local_only = sinkhorn_assign(features[: split[0]], codebook, normalization=normalization)
            results[name] = {
                "mismatches": int((gathered != single).sum()),
                "default_blocks_mismatches": int((default_blocks != single).sum()),
                "rows": int(single.numel()),
                # the global plan differs from rank 0's own batch (so the test can tell the two apart)
                "local_differs": bool(split[0] == 0 or not torch.equal(gathered[: split[0]], local_only)),
            }

    soft_plan_cases(rank, results)
    float64_cases(rank, results)
    otvae_cases(rank, results)

    # Through the quantizer in training mode: global by default, local with sync_across_ranks=False.
    torch.manual_seed(0)
    quantizer = OptVQQuantizer(dim=8, codebook_size=64, num_heads=2).train()
    generator = torch.Generator().manual_seed(7)
    batch = torch.randn(4, 8, 6, 6, generator=generator)
    local_batch = batch[rank * 2 : rank * 2 + 2]
    tokens = quantizer(local_batch).token_ids
    gathered = gather_ids(tokens.flatten())
    quantizer.sync_across_ranks = False
    local_tokens = quantizer(local_batch).token_ids
    if rank == 0:
        single = torch.cat([quantizer(batch[i * 2 : i * 2 + 2]).token_ids.flatten() for i in range(2)])
        joint = quantizer(batch).token_ids  # one process on the concatenated batch (no sync: rank 0 alone)
        results["quantizer"] = {
            "mismatches": int((gathered.reshape(2, -1) != joint.reshape(2, -1)).sum()),
            "rows": int(joint.numel()),
            "local_differs": not torch.equal(gathered, single),
            "unsynced_is_local": torch.equal(local_tokens.flatten(), single[: local_tokens.numel()]),
        }
        with open(sys.argv[1], "w") as handle:
            json.dump(results, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
