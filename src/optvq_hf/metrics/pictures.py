"""Pictures of an evaluation: originals above their reconstructions, and the code-usage histogram.

Training (`examples/run_train.py`, every `--validation_steps`) and evaluation (`examples/run_eval.py`) write them
with these two functions.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .functional import codebook_statistics

__all__ = ["save_reconstruction_grid", "save_usage_histogram"]


def _to_uint8(pixel_values: torch.Tensor) -> np.ndarray:
    unit = ((pixel_values.detach().float().cpu().clamp(-1, 1) + 1) / 2).nan_to_num(0.5)
    array = (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def save_reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: str, scale: int = 1,
                             padding: int = 2) -> str:
    """Save a PNG with the originals on the top row and their reconstructions below.

    Args:
        originals (`torch.Tensor` of shape `(N, C, H, W)`): images in [-1, 1] (1 or 3 channels).
        reconstructions (`torch.Tensor` of shape `(N, C, H, W)`): their reconstructions, in [-1, 1] (clamped).
        path (`str`): where to write the PNG.
        scale (`int`, defaults to 1): nearest-neighbour upscaling of the whole picture (small images stay visible).
        padding (`int`, defaults to 2): white pixels around and between the images.

    Returns the path.
    """
    if originals.shape != reconstructions.shape or originals.ndim != 4:
        raise ValueError(f"Expected two (N, C, H, W) batches of one shape, got {tuple(originals.shape)} and "
                         f"{tuple(reconstructions.shape)}.")
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


def save_usage_histogram(counts, path: str, title: str = "Code usage") -> str:
    """Save a PNG of how often each code was used: counts by code index (left) and sorted, most used first, on a
    log scale (right); the title adds the usage, perplexity and dead codes of [`codebook_statistics`].

    Args:
        counts (`torch.Tensor`, `np.ndarray` or a list, shape `(codebook_size,)`): the code histogram.
        path (`str`): where to write the PNG.
        title (`str`, defaults to `"Code usage"`): the start of the title.

    Returns the path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = counts.detach().double().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts, float)
    stats = codebook_statistics(values)
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.2), dpi=100)
    axes[0].bar(np.arange(len(values)), values, width=1.0, color="#3b6ea8")
    axes[0].set_xlabel("code index")
    axes[0].set_ylabel("tokens")
    axes[1].plot(np.sort(values)[::-1], color="tab:orange")
    axes[1].set_yscale("symlog")
    axes[1].set_xlabel("codes, most used first")
    axes[1].set_ylabel("tokens")
    figure.suptitle(f"{title}: usage {100 * stats['codebook_usage']:.1f}%, perplexity {stats['perplexity']:.1f}, "
                    f"{stats['dead_codes']} dead")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
