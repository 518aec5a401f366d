"""Reconstruction metrics and pictures for OptVQ training: per-image PSNR, code usage, grids, usage histograms."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

__all__ = ["per_image_psnr", "codebook_statistics", "save_reconstruction_grid", "save_usage_histogram"]


def per_image_psnr(reconstruction: torch.Tensor, target: torch.Tensor, max_mse_floor: float = 1e-10) -> torch.Tensor:
    """PSNR of each image `(B,)` in dB, over pixels mapped from [-1, 1] to [0, 1] (reconstructions clamped).

    `10 * log10(1 / mse)` with the mean squared error of the image floored at `max_mse_floor` (a perfect
    reconstruction gives 100 dB rather than infinity).
    """
    if reconstruction.shape != target.shape:
        raise ValueError(f"Shapes differ: {tuple(reconstruction.shape)} vs {tuple(target.shape)}.")
    rec = ((reconstruction.float().clamp(-1, 1) + 1) / 2)
    ref = ((target.float().clamp(-1, 1) + 1) / 2)
    mse = (rec - ref).pow(2).flatten(1).mean(1).clamp_min(max_mse_floor)
    return -10.0 * torch.log10(mse)


def codebook_statistics(counts: torch.Tensor) -> dict[str, float]:
    """Usage (fraction of codes used), perplexity (`exp` of the entropy) and dead codes of a code histogram."""
    counts = counts.double()
    total = float(counts.sum())
    used = int((counts > 0).sum())
    if total > 0:
        probabilities = counts / total
        entropy = float(-(probabilities[probabilities > 0] * probabilities[probabilities > 0].log()).sum())
    else:
        entropy = 0.0
    return {"codebook_usage": used / counts.numel(), "perplexity": math.exp(entropy),
            "dead_codes": counts.numel() - used, "num_tokens": int(total)}


def _to_uint8(pixel_values: torch.Tensor) -> np.ndarray:
    unit = ((pixel_values.detach().float().cpu().clamp(-1, 1) + 1) / 2).nan_to_num(0.5)
    array = (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def save_reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: str, scale: int = 1,
                             padding: int = 2) -> str:
    """Save a PNG with originals on the top row and their reconstructions below (images in [-1, 1])."""
    top, bottom = _to_uint8(originals), _to_uint8(reconstructions)
    count, height, width, _ = top.shape
    canvas = np.full((2 * height + 3 * padding, count * width + (count + 1) * padding, 3), 255, dtype=np.uint8)
    for index in range(count):
        left = padding + index * (width + padding)
        canvas[padding:padding + height, left:left + width] = top[index]
        canvas[2 * padding + height:2 * padding + 2 * height, left:left + width] = bottom[index]
    image = Image.fromarray(canvas)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)
    return path


def save_usage_histogram(counts: torch.Tensor, path: str, title: str = "Code usage") -> str:
    """Save a PNG bar chart of how often each code was used (codes sorted by frequency) with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = counts.detach().double().cpu().numpy()
    stats = codebook_statistics(counts)
    figure, axis = plt.subplots(figsize=(8, 3), dpi=100)
    ordered = np.sort(values)[::-1]
    axis.bar(np.arange(len(ordered)), ordered, width=1.0, color="#3b6ea8")
    axis.set_xlabel("codes, sorted by use")
    axis.set_ylabel("tokens")
    axis.set_title(f"{title}: usage {100 * stats['codebook_usage']:.1f}%, perplexity {stats['perplexity']:.1f}, "
                   f"{stats['dead_codes']} dead")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
