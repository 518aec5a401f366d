"""Evaluation metrics for image tokenizers, shipped as `evaluate` modules that load offline.

Each metric is a folder next to this file (`psnr/psnr.py`, ...), so it loads with `evaluate.load` by path, or with
[`load`]::

    import optvq_hf.metrics
    psnr = optvq_hf.metrics.load("psnr")                       # == evaluate.load(optvq_hf.metrics.module_path("psnr"))
    for batch in loader:
        psnr.add_batch(predictions=reconstructions, references=pixel_values)
    psnr.compute()   # {"psnr": ..., "psnr_of_mean_mse": ..., "num_samples": ...}

Metrics: `psnr`, `ssim`, `lpips` (needs `network=`), `rfid` (needs `feature_extractor=`), and the codebook metrics
`codebook_usage`, `perplexity`, `dead_codes` (need `codebook_size=`). See `docs/evaluation.md`.

This package is the one metrics stack of the project: the `evaluate` modules, `examples/run_eval.py` and the training
loop ([`optvq_hf.training`]) all compute PSNR, SSIM, LPIPS, rFID and the codebook statistics with the functions
below, and write their pictures with [`save_reconstruction_grid`] and [`save_usage_histogram`].
"""

from __future__ import annotations

import os

from .functional import (
    codebook_statistics,
    code_histogram,
    frechet_distance,
    per_image_mse,
    per_image_psnr,
    per_image_ssim,
    to_unit_images,
)
from .networks import LPIPS_WEIGHTS_NAME, ImageFeatureExtractor, LPIPSNetwork, load_feature_extractor
from .pictures import save_reconstruction_grid, save_usage_histogram

METRICS_DIR = os.path.dirname(os.path.abspath(__file__))
AVAILABLE_METRICS = ("psnr", "ssim", "lpips", "rfid", "codebook_usage", "perplexity", "dead_codes")

__all__ = [
    "AVAILABLE_METRICS",
    "load",
    "module_path",
    "codebook_statistics",
    "code_histogram",
    "frechet_distance",
    "per_image_mse",
    "per_image_psnr",
    "per_image_ssim",
    "to_unit_images",
    "ImageFeatureExtractor",
    "LPIPSNetwork",
    "LPIPS_WEIGHTS_NAME",
    "load_feature_extractor",
    "save_reconstruction_grid",
    "save_usage_histogram",
]


def module_path(name: str) -> str:
    """Folder of the `evaluate` module `name` (pass it to `evaluate.load`)."""
    if name not in AVAILABLE_METRICS:
        raise ValueError(f"Unknown metric {name!r}; available metrics: {', '.join(AVAILABLE_METRICS)}.")
    return os.path.join(METRICS_DIR, name)


def load(name: str, **kwargs):
    """Load one of this package's metrics with `evaluate.load`, offline.

    Args:
        name (`str`): one of `AVAILABLE_METRICS`.
        kwargs: passed to `evaluate.load` and from there to the metric (`codebook_size=`, `network=`,
            `feature_extractor=`, `input_range=`, and `num_process=`, `process_id=`, `experiment_id=`,
            `keep_in_memory=` for distributed evaluation).
    """
    import evaluate

    return evaluate.load(module_path(name), **kwargs)
