"""Codebook initialization from encoder features: k-means (the OptVQ configs) or random features (the VQ baseline)."""

from __future__ import annotations

import torch

__all__ = ["kmeans", "sample_codes", "set_codebook", "features_to_rows", "CODEBOOK_INIT_METHODS"]

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
