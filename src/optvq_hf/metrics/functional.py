"""Per-image reconstruction statistics and codebook statistics, in plain torch.

Every function here works on one batch and returns one value per image (or per token), so that a dataset-level
metric is a reduction over images that does not depend on how the images were batched or split across processes.
The `evaluate` modules of [`optvq_hf.metrics`] store these per-image values and reduce them at `compute` time.

Image conventions: `(B, C, H, W)` (or `(B, H, W)` for grayscale) float tensors or arrays in `input_range`
(defaults to the model's `[-1, 1]`), or `uint8` in `[0, 255]`. Values outside the range are clipped, then mapped to
`[0, 1]`; PSNR and SSIM use a data range of 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..validation import check_token_ids

__all__ = [
    "to_unit_images",
    "per_image_mse",
    "per_image_psnr",
    "per_image_ssim",
    "gaussian_kernel_1d",
    "code_histogram",
    "codebook_statistics",
    "frechet_distance",
    "MAX_PSNR",
]

# PSNR of a perfect reconstruction is infinite; report this instead so that means stay finite.
MAX_PSNR = 100.0


def to_unit_images(images, input_range: Sequence[float] = (-1.0, 1.0), name: str = "images") -> torch.Tensor:
    """Convert a batch of images to a float64 tensor `(B, C, H, W)` in `[0, 1]`.

    Args:
        images (`torch.Tensor`, `np.ndarray` or a list of them): `(B, C, H, W)` or `(B, H, W)`; `uint8` values are
            read as `[0, 255]`, float values as `input_range` (clipped to it).
        input_range (`tuple[float, float]`, defaults to `(-1.0, 1.0)`): range of float inputs.
        name (`str`): how to call the input in error messages.
    """
    if images is None:
        raise ValueError(f"`{name}` is required.")
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError(f"`{name}` is empty.")
        images = torch.stack([torch.as_tensor(np.asarray(image)) for image in images])
    tensor = torch.as_tensor(images) if not isinstance(images, torch.Tensor) else images
    tensor = tensor.detach().cpu()
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(1)
    if tensor.ndim != 4:
        raise ValueError(f"`{name}` must have shape (B, C, H, W) or (B, H, W), got {tuple(tensor.shape)}.")
    if tensor.dtype == torch.uint8:
        return tensor.double() / 255.0
    if not tensor.is_floating_point():
        raise ValueError(f"`{name}` must be uint8 or floating point, got {tensor.dtype}.")
    low, high = float(input_range[0]), float(input_range[1])
    if not high > low:
        raise ValueError(f"`input_range` must be (low, high) with high > low, got {tuple(input_range)}.")
    tensor = torch.nan_to_num(tensor.double(), nan=low, posinf=high, neginf=low).clamp(low, high)
    return (tensor - low) / (high - low)


def _check_pair(predictions: torch.Tensor, references: torch.Tensor):
    if predictions.shape != references.shape:
        raise ValueError(
            f"`predictions` and `references` must have the same shape, got {tuple(predictions.shape)} and "
            f"{tuple(references.shape)}."
        )


def per_image_mse(predictions: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Mean squared error of every image, `(B,)` float64. Inputs as returned by [`to_unit_images`]."""
    _check_pair(predictions, references)
    return ((predictions.double() - references.double()) ** 2).flatten(1).mean(dim=1)


def per_image_psnr(predictions: torch.Tensor, references: torch.Tensor, data_range: float = 1.0,
                   max_psnr: float = MAX_PSNR) -> torch.Tensor:
    """PSNR in dB of every image, `10 * log10(data_range**2 / mse)`, `(B,)` float64, capped at `max_psnr` (a perfect
    reconstruction would otherwise be infinite). Inputs as returned by [`to_unit_images`]."""
    mse = per_image_mse(predictions, references)
    floor = data_range**2 * 10 ** (-max_psnr / 10)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(floor))


def gaussian_kernel_1d(sigma: float = 1.5, truncate: float = 3.5, dtype=torch.float64) -> torch.Tensor:
    """The normalized 1-D Gaussian of `scipy.ndimage.gaussian_filter` (radius `int(truncate * sigma + 0.5)`)."""
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=dtype)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def _separable_filter(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Valid (unpadded) separable convolution of `(N, 1, H, W)` by `kernel` along both axes."""
    size = kernel.numel()
    out = nn.functional.conv2d(images, kernel.view(1, 1, 1, size))
    return nn.functional.conv2d(out, kernel.view(1, 1, size, 1))


def per_image_ssim(
    predictions: torch.Tensor,
    references: torch.Tensor,
    data_range: float = 1.0,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """SSIM of every image (Wang et al. 2004: Gaussian window, sigma 1.5), averaged over channels, `(B,)` float64.

    Equal to `skimage.metrics.structural_similarity(pred, ref, data_range=1, channel_axis=0, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False)`: scikit-image filters with reflected borders and then drops a border of
    the window's radius before averaging, so only unpadded ("valid") windows count, which is what we compute.
    """
    _check_pair(predictions, references)
    kernel = gaussian_kernel_1d(sigma).to(predictions.device)
    size = kernel.numel()
    batch, channels, height, width = predictions.shape
    if height < size or width < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} pixels (sigma={sigma}), got {height}x{width}.")
    x = predictions.double().reshape(batch * channels, 1, height, width)
    y = references.double().reshape(batch * channels, 1, height, width)
    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1).reshape(-1, 1, height, width)
    filtered = _separable_filter(stacked, kernel).reshape(batch * channels, 5, height - size + 1, width - size + 1)
    mu_x, mu_y, xx, yy, xy = filtered.unbind(1)
    var_x, var_y, cov_xy = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1).reshape(batch, channels).mean(dim=1)


def code_histogram(token_ids, codebook_size: int) -> np.ndarray:
    """How often each code occurs in `token_ids` (a tensor or array of any shape, or a list of sequences),
    `(codebook_size,)` int64."""
    if isinstance(token_ids, (list, tuple)):
        parts = [np.asarray(item, dtype=np.int64).ravel() for item in token_ids]
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    else:
        flat = (token_ids.detach().cpu().numpy() if isinstance(token_ids, torch.Tensor) else np.asarray(token_ids))
        flat = flat.astype(np.int64, copy=False).ravel()
    check_token_ids(torch.from_numpy(flat), codebook_size)
    return np.bincount(flat, minlength=codebook_size).astype(np.int64)


def codebook_statistics(counts) -> dict[str, float]:
    """Usage statistics of a code histogram (the one definition used by training, evaluation and the metrics).

    Args:
        counts (`np.ndarray`, `torch.Tensor` or a list, shape `(codebook_size,)`): how often each code was used
            (float counts, e.g. sums reduced across processes, are rounded to integers).

    Returns:
        `dict` with `codebook_usage` (fraction of codes used at least once), `perplexity` (`exp` of the entropy of
        the code distribution: 1 for a single code, `codebook_size` for a uniform one), `dead_codes` (codes never
        used), `used_codes` and `num_tokens`.

    The perplexity of an empty histogram (no tokens) is 0.0, not `exp(0) = 1`: perplexity is the effective number
    of codes in use and never exceeds `used_codes`, which is 0 there; 1.0 would report one code in use. Any
    non-empty histogram has a perplexity of at least 1, so 0.0 also marks "nothing counted" unambiguously.
    """
    if isinstance(counts, torch.Tensor):
        counts = counts.detach().cpu().double().numpy()
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"`counts` must be a non-empty 1-D histogram, got shape {counts.shape}.")
    if counts.dtype.kind == "f":
        counts = np.rint(counts)
    counts = counts.astype(np.int64)
    total = int(counts.sum())
    used = int((counts > 0).sum())
    if total > 0:
        probabilities = counts[counts > 0] / total
        perplexity = float(np.exp(-(probabilities * np.log(probabilities)).sum()))
    else:
        perplexity = 0.0
    return {
        "codebook_usage": used / counts.size,
        "perplexity": perplexity,
        "dead_codes": int(counts.size - used),
        "used_codes": used,
        "num_tokens": total,
    }


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between Gaussians: `|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`.

    `tr((S1 S2)^(1/2))` is computed as `sum(sqrt(eig(S1^(1/2) S2 S1^(1/2))))`, a symmetric positive semi-definite
    matrix, so the result is real and finite for any covariance matrices (no complex `sqrtm` residue).
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"Feature statistics must match, got means {mu1.shape} / {mu2.shape} and covariances {sigma1.shape} / "
            f"{sigma2.shape}."
        )
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())
    distance = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)
    return max(distance, 0.0)


def mean_and_covariance(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of `(N, D)` features, float64, independent of the order of the rows.

    Rows are sorted lexicographically first, so the same set of features gives bit-identical statistics however it
    was batched or split across processes.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"Need features of shape (N >= 2, D) for a covariance, got {features.shape}.")
    features = features[np.lexsort(features.T[::-1])]
    mean = features.mean(axis=0)
    centered = features - mean
    return mean, centered.T @ centered / (features.shape[0] - 1)


def exact_mean(values) -> float:
    """Mean of floats with `math.fsum` (correctly rounded, so independent of order and of how values were split)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("Cannot average an empty set of values.")
    return math.fsum(values) / len(values)
