"""Run by tests/test_sinkhorn_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU): in eval mode the
quantizers never communicate. Only rank 0 quantizes; rank 1 joins no collective until rank 0 is done (it waits for
a file), so any collective in eval mode would block rank 0 until the process group's 30 s timeout fails it.
Rank 0 writes its results (eval tokens / targets equal those of its rows alone) to the JSON file argv[1]."""

import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from optvq_hf import OptVQConfig, OptVQModel, OptVQQuantizer, OTVAEQuantizer
from optvq_hf.sinkhorn import sinkhorn_assign, sinkhorn_plan


def main():
    out = sys.argv[1]
    done = out + ".done"
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    if rank == 0:
        torch.manual_seed(0)
        features = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(1))
        rows = features.permute(0, 2, 3, 1).reshape(-1, 4)
        optvq = OptVQQuantizer(dim=8, codebook_size=32, num_heads=2, inference_assignment="sinkhorn").eval()
        tokens = optvq(features).token_ids.permute(0, 2, 3, 1).reshape(-1)
        otvae = OTVAEQuantizer(dim=8, codebook_size=32, num_heads=2).eval()
        targets = otvae.targets(rows, otvae.codebook.detach())
        model = OptVQModel(OptVQConfig.from_preset("optvq-mnist", codebook_size=64,
                                                   inference_assignment="sinkhorn")).eval()
        pixels = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
        with torch.no_grad():
            encoded = model.encode(pixels)
            latent_rows = encoded.latents.permute(0, 2, 3, 1).reshape(-1, 2)
            model_tokens = encoded.token_ids.permute(0, 2, 3, 1).reshape(-1)
        results = {
            "optvq": torch.equal(tokens, sinkhorn_assign(rows, optvq.codebook.detach())),
            "otvae": float((targets - sinkhorn_plan(rows, otvae.codebook.detach())).abs().max()),
            "model": torch.equal(model_tokens, sinkhorn_assign(latent_rows, model.get_codebook())),
        }
        with open(out, "w") as handle:
            json.dump(results, handle)
        open(done, "w").close()
    else:
        deadline = time.monotonic() + 120
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
