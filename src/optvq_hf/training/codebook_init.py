"""Codebook initialization from encoder features: k-means (the OptVQ configs) or random features (the VQ baseline).

[`initialize_codebook`] runs the whole recipe, in one process or many: encode a few batches, gather the feature rows
of every process, compute the codes, and broadcast them so that every replica starts from the same codebook.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

__all__ = ["initialize_codebook", "kmeans", "sample_codes", "set_codebook", "features_to_rows",
           "CODEBOOK_INIT_METHODS"]

CODEBOOK_INIT_METHODS = ("none", "kmeans", "random")


def features_to_rows(latents: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Split latents `(B, embed_dim, h, w)` into the rows the quantizer sees: `(B*h*w*num_heads, embed_dim/num_heads)`."""
    if latents.ndim != 4 or latents.shape[1] % num_heads:
        raise ValueError(f"Expected latents (B, C, h, w) with C divisible by {num_heads}, got {tuple(latents.shape)}.")
    batch, channels, height, width = latents.shape
    return latents.detach().float().permute(0, 2, 3, 1).reshape(-1, channels // num_heads)


def _nearest(points: torch.Tensor, centers: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    center_norms = centers.pow(2).sum(1)
    out = torch.empty(points.shape[0], dtype=torch.long, device=points.device)
    for start in range(0, points.shape[0], chunk):
        block = points[start:start + chunk]
        # argmin ||p - c||^2 = argmin (||c||^2 - 2 p.c)
        out[start:start + chunk] = (center_norms[None, :] - 2 * block @ centers.T).argmin(1)
    return out


@torch.no_grad()
def kmeans(points: torch.Tensor, num_clusters: int, num_iters: int = 50,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Lloyd's k-means on `points` `(N, d)`; returns `(num_clusters, d)` centers.

    Centers start at distinct random points; a cluster that becomes empty is re-seeded at a random point. With
    fewer points than clusters, the points are repeated with small noise so that every code gets a distinct start.

    Args:
        points (`torch.Tensor` of shape `(N, d)`): the data (float).
        num_clusters (`int`): number of centers (the codebook size).
        num_iters (`int`, defaults to 50): Lloyd iterations.
        generator (`torch.Generator`, *optional*): randomness of the initialization (on the points' device).
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"`points` must be a non-empty (N, d) tensor, got {tuple(points.shape)}.")
    if num_clusters < 1:
        raise ValueError(f"`num_clusters` must be >= 1, got {num_clusters}.")
    points = points.float()
    if points.shape[0] < num_clusters:
        repeats = -(-num_clusters // points.shape[0])
        scale = points.std().clamp_min(1e-6) * 1e-3
        noise = torch.randn(points.shape[0] * repeats, points.shape[1], generator=generator, device=points.device)
        points = points.repeat(repeats, 1) + scale * noise
    num_points = points.shape[0]
    centers = points[torch.randperm(num_points, generator=generator, device=points.device)[:num_clusters]].clone()
    for _ in range(num_iters):
        labels = _nearest(points, centers)
        counts = torch.bincount(labels, minlength=num_clusters).float()
        sums = torch.zeros_like(centers).index_add_(0, labels, points)
        empty = counts == 0
        centers = torch.where(empty[:, None], centers, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            picks = torch.randint(0, num_points, (int(empty.sum()),), generator=generator, device=points.device)
            centers[empty] = points[picks]
    return centers


@torch.no_grad()
def sample_codes(points: torch.Tensor, num_codes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`num_codes` distinct random rows of `points` (with replacement only if there are too few rows)."""
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"`points` must be a non-empty (N, d) tensor, got {tuple(points.shape)}.")
    if points.shape[0] >= num_codes:
        index = torch.randperm(points.shape[0], generator=generator, device=points.device)[:num_codes]
    else:
        index = torch.randint(0, points.shape[0], (num_codes,), generator=generator, device=points.device)
    return points[index].float().clone()


@torch.no_grad()
def set_codebook(quantizer, codes: torch.Tensor):
    """Make the quantizer's codebook in use (after its shared projection, if any) equal to `codes` `(K, d)`: the
    member's own `CodebookQuantizer.set_codebook`, which knows how its codebook is parameterized."""
    quantizer.set_codebook(codes)


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _gather_rows(local: torch.Tensor, group=None) -> torch.Tensor:
    """The rows of every process, in rank order (any number of rows per process)."""
    if not _distributed(group):
        return local
    world = dist.get_world_size(group)
    size = torch.tensor([local.shape[0]], device=local.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in sizes]
    padded = local.new_zeros(max(sizes), local.shape[1])
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:rows] for part, rows in zip(parts, sizes)])


@torch.no_grad()
def initialize_codebook(model, pixel_batches: Iterable[torch.Tensor], method: str = "kmeans", num_iters: int = 30,
                        max_points_per_code: int = 50, seed: int = 0, process_group=None) -> int:
    """Set the codebook of `model` from its encoder's features of `pixel_batches`.

    Every process encodes its own batches (in eval mode) and splits the latents into the rows the quantizer sees;
    the rows of all processes are gathered (`torch.distributed`, when initialized), the codes are computed with a
    generator seeded by `seed` (k-means over at most `max_points_per_code * codebook_size` random rows, or distinct
    random rows), set with the member's `set_codebook`, and the quantizer's parameters are broadcast from the first process so
    that every replica starts equal.

    Args:
        model ([`OptVQModel`]): the model (not a DDP wrapper).
        pixel_batches (iterable of `torch.Tensor` `(B, C, H, W)` in [-1, 1]): this process's batches.
        method (`str`, defaults to `"kmeans"`): `"kmeans"` (the OptVQ recipe) or `"random"` (the VQ baseline).
        num_iters (`int`, defaults to 30): k-means iterations.
        max_points_per_code (`int`, defaults to 50): cap on the k-means points, per code.
        seed (`int`, defaults to 0): seed of the subsampling, the k-means start and the random picks.
        process_group (*optional*): the `torch.distributed` group to gather over (default: the whole world).

    Returns:
        `int`: the number of feature rows the codes were computed from (over all processes, after subsampling).
    """
    if method not in CODEBOOK_INIT_METHODS or method == "none":
        raise ValueError(f"`method` must be 'kmeans' or 'random', got {method!r}.")
    quantizer = model.quantizer
    codes_shape = (quantizer.codebook_size, quantizer.code_dim)
    device = next(quantizer.parameters()).device
    was_training = model.training
    model.eval()
    rows = [features_to_rows(model.encode_latents(pixels.to(device)), quantizer.num_heads) for pixels in pixel_batches]
    model.train(was_training)
    local = torch.cat(rows) if rows else torch.zeros(0, codes_shape[1], device=device)
    features = _gather_rows(local, process_group)
    if features.shape[0] == 0:
        raise ValueError("No batch to initialize the codebook from.")
    generator = torch.Generator(device=features.device).manual_seed(seed)
    if method == "kmeans":
        limit = max_points_per_code * codes_shape[0]
        if features.shape[0] > limit:
            features = features[torch.randperm(features.shape[0], generator=generator, device=features.device)[:limit]]
        codes = kmeans(features, codes_shape[0], num_iters=num_iters, generator=generator)
    else:
        codes = sample_codes(features, codes_shape[0], generator=generator)
    set_codebook(quantizer, codes)
    if _distributed(process_group):
        source = dist.get_global_rank(process_group, 0) if process_group is not None else 0
        for tensor in quantizer.parameters():
            dist.broadcast(tensor.data, src=source, group=process_group)
    return int(features.shape[0])
