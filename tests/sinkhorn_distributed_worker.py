"""Run by tests/test_sinkhorn_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Every rank takes its own, unevenly sized slice of one seeded global batch, assigns it with the global Sinkhorn
(`process_group="world"`, and through `OptVQQuantizer` in training mode), gathers all ranks' ids, and rank 0 compares
them with one process on the concatenated batch. Results go to the JSON file named by argv[1].
"""

import json
import sys

import torch
import torch.distributed as dist

from optvq_hf import OptVQQuantizer
from optvq_hf.sinkhorn import sinkhorn_assign


def gather_ids(local_ids: torch.Tensor) -> torch.Tensor:
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([local_ids.numel()]))
    largest = int(max(sizes))
    padded = torch.full((largest,), -1, dtype=torch.long)
    padded[: local_ids.numel()] = local_ids
    gathered = [torch.empty(largest, dtype=torch.long) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(n)] for g, n in zip(gathered, sizes)])


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
    }
    for name, (split, codes, dim, normalization, streaming) in cases.items():
        generator = torch.Generator().manual_seed(len(name) * 1000 + codes)
        features = torch.randn(sum(split), dim, generator=generator) * 2.0 + 0.5
        codebook = torch.randn(codes, dim, generator=generator)
        start = sum(split[:rank])
        local = features[start : start + split[rank]]
        ids = sinkhorn_assign(
            local, codebook, normalization=normalization, process_group="world", streaming=streaming, block_size=37
        )
        gathered = gather_ids(ids)
        if rank == 0:
            single = sinkhorn_assign(features, codebook, normalization=normalization)
            local_only = sinkhorn_assign(features[: split[0]], codebook, normalization=normalization)
            results[name] = {
                "mismatches": int((gathered != single).sum()),
                "rows": int(single.numel()),
                # the global plan differs from rank 0's own batch (so the test can tell the two apart)
                "local_differs": bool(split[0] == 0 or not torch.equal(gathered[: split[0]], local_only)),
            }

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
