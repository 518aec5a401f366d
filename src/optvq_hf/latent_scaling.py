"""The latent-diffusion `scaling_factor` of a VQ model: `1 / std` of its latents over data.

Works with any model with `encode(x).latents` (an [`OptVQVQModel`] or any `diffusers.VQModel`); diffusers is not
needed to compute it. [`OptVQVQModel.fit_scaling_factor`] computes and stores it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

__all__ = ["compute_scaling_factor"]


def _first_image_tensor(batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key in ("pixel_values", "images", "image", "sample"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
        values = [value for value in batch.values() if isinstance(value, torch.Tensor) and value.ndim == 4]
    elif isinstance(batch, (list, tuple)):
        values = [value for value in batch if isinstance(value, torch.Tensor) and value.ndim == 4]
    else:
        values = []
    if not values:
        raise ValueError(
            f"Could not find a (B, C, H, W) image tensor in a batch of type {type(batch).__name__}; pass tensors, "
            "dicts with `pixel_values`, or tuples whose first 4-D tensor holds the images."
        )
    return values[0]


@torch.no_grad()
def compute_scaling_factor(vqvae, batches, max_batches: int | None = None) -> float:
    """`1 / std` of a VQ model's latents over data: the `scaling_factor` latent diffusion needs (LDM paper, D.1).

    Latent-diffusion pipelines generate `z` and decode `z / scaling_factor`, so a diffusion model is trained on
    `vqvae.encode(x).latents * scaling_factor`; this makes those latents unit-variance. The standard deviation is taken
    over all elements (batch, channels, positions) in float64, in eval mode, as Stable Diffusion's 0.18215 was.

    Args:
        vqvae (`diffusers.VQModel`, e.g. [`OptVQVQModel`]): any model with `encode(x).latents`.
        batches: a tensor `(B, in_channels, H, W)` in [-1, 1], or an iterable of tensors / dicts (key
            `pixel_values`, `images`, `image` or `sample`) / tuples (first 4-D tensor), e.g. a `DataLoader`.
        max_batches (`int`, *optional*): stop after this many batches.

    Returns:
        `float`: `1 / std`.
    """
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    elif not isinstance(batches, Iterable):
        raise ValueError(f"`batches` must be a tensor or an iterable of batches, got {type(batches).__name__}.")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"`max_batches` must be >= 1, got {max_batches}.")
    was_training = vqvae.training
    vqvae.eval()
    device = next(vqvae.parameters()).device
    count, total, total_sq = 0, 0.0, 0.0
    try:
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            images = _first_image_tensor(batch).to(device)
            latents = vqvae.encode(images).latents.double()
            count += latents.numel()
            total += float(latents.sum())
            total_sq += float((latents**2).sum())
    finally:
        vqvae.train(was_training)
    if count < 2:
        raise ValueError("`batches` gave fewer than 2 latent values; cannot compute a standard deviation.")
    variance = (total_sq - total**2 / count) / (count - 1)
    if not math.isfinite(variance) or variance <= 0:
        raise ValueError(f"The latents have zero (or non-finite) variance ({variance}); cannot compute a scale.")
    return 1.0 / math.sqrt(variance)
