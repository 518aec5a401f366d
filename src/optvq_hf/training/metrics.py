"""Training-side names of the metrics stack: everything here is [`optvq_hf.metrics`] (one definition of each metric,
picture and statistic), plus `per_image_psnr` for images in the model's [-1, 1] range."""

from __future__ import annotations

import math

import torch

from ..metrics.functional import codebook_statistics, per_image_psnr as _unit_per_image_psnr, to_unit_images
from ..metrics.pictures import save_reconstruction_grid, save_usage_histogram

__all__ = ["per_image_psnr", "codebook_statistics", "save_reconstruction_grid", "save_usage_histogram"]


def per_image_psnr(reconstruction: torch.Tensor, target: torch.Tensor, max_mse_floor: float = 1e-10) -> torch.Tensor:
    """PSNR of each image `(B,)` in dB (float64, on CPU), over pixels mapped from [-1, 1] to [0, 1] (values outside
    are clipped): [`optvq_hf.metrics.functional.per_image_psnr`] of both images after [`to_unit_images`].

    `10 * log10(1 / mse)` with the mean squared error of the image floored at `max_mse_floor` (a perfect
    reconstruction gives 100 dB rather than infinity).
    """
    return _unit_per_image_psnr(to_unit_images(reconstruction, name="reconstruction"),
                                to_unit_images(target, name="target"), max_psnr=-10 * math.log10(max_mse_floor))
