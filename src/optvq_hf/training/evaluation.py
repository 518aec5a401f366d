"""Evaluation and logging during training, across processes: reconstruction metrics of a held-out set and running
means of the loss terms. Both reduce with `torch.distributed` (when initialized), so every process gets the result
over all of them, and both compute their statistics with [`optvq_hf.metrics`]."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist

from ..metrics.functional import code_histogram, codebook_statistics, per_image_psnr, to_unit_images
from .data import to_pixel_values
from .diagnostics import ReconstructionSpread, all_reduce_over_processes

__all__ = ["evaluate_reconstruction", "RunningMeans"]


@torch.no_grad()
def evaluate_reconstruction(model, images: torch.Tensor, batch_size: int = 256,
                            autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                            process_group=None) -> tuple[dict, torch.Tensor]:
    """Mean per-image PSNR (pixels in [0, 1]), codebook statistics and the reconstructions' spread across images (the
    dead-run signal of [`ReconstructionSpread`]) of `model` on uint8 images.

    Process `r` of `w` reconstructs images `r, r + w, ...`; every process runs the same number of batches (the last
    ones padded and masked), so collectives inside the model stay matched. The sums are all-reduced, so every process
    returns the result over all images. PSNR and the statistics are [`optvq_hf.metrics.functional`]'s.

    Args:
        model ([`OptVQModel`]): the model (not a DDP wrapper); evaluated in eval mode, then put back.
        images (`torch.Tensor` of shape `(N, C, H, W)`, uint8): the evaluation images (on CPU).
        batch_size (`int`, defaults to 256): images per forward pass.
        autocast (callable returning a context manager, *optional*): e.g. `accelerator.autocast`.
        process_group (*optional*): the `torch.distributed` group to reduce over.

    Returns:
        `(metrics, counts)`: `psnr`, `num_eval_images`, every key of [`codebook_statistics`] and, with two images or
        more, `reconstruction_spread`; the code histogram `(codebook_size,)` float64 on CPU.
    """
    device = next(model.parameters()).device
    world = dist.get_world_size(process_group) if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank(process_group) if world > 1 else 0
    per_rank = math.ceil(images.shape[0] / world)
    indices = torch.arange(rank, per_rank * world, world)
    valid = indices < images.shape[0]
    indices = torch.where(valid, indices, torch.zeros_like(indices))
    codebook_size = model.config.codebook_size
    totals = torch.zeros(2 + codebook_size, dtype=torch.float64)  # PSNR sum, images, code histogram
    spread = ReconstructionSpread()
    was_training = model.training
    model.eval()
    for start in range(0, per_rank, batch_size):
        mask = valid[start:start + batch_size]
        pixel_values = to_pixel_values(images[indices[start:start + batch_size]]).to(device)
        with autocast() if autocast is not None else contextlib.nullcontext():
            output = model(pixel_values)
        psnr = per_image_psnr(to_unit_images(output.reconstruction), to_unit_images(pixel_values))
        totals[0] += float(psnr[mask].sum())
        totals[1] += float(mask.sum())
        totals[2:] += torch.from_numpy(code_histogram(output.token_ids[mask.to(device)], codebook_size))
        spread.update(pixel_values, output.reconstruction, mask)
    model.train(was_training)
    totals = all_reduce_over_processes(totals.to(device), process_group=process_group).cpu()
    counts = totals[2:]
    metrics = {"psnr": float(totals[0] / totals[1].clamp_min(1)), "num_eval_images": int(totals[1])}
    metrics.update(codebook_statistics(counts))
    ratio = spread.reduce_(lambda sums: all_reduce_over_processes(sums, process_group=process_group)).ratio
    if math.isfinite(ratio):  # needs two images or more
        metrics["reconstruction_spread"] = ratio
    return metrics, counts


class RunningMeans:
    """Means of named scalars (e.g. the loss terms of every micro-batch between two logs), kept as tensors on their
    device (no host synchronization per step) and averaged over all processes when read.

    Terms are whatever names the caller adds, so a new loss term is logged without touching the training loop. Every
    process must add the same names (they do, as they run the same steps).
    """

    def __init__(self):
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, values: Mapping[str, torch.Tensor | float]):
        """Add one value of each named scalar."""
        for name, value in values.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            self._sums[name] = self._sums[name] + value if name in self._sums else value.clone()
            self._counts[name] = self._counts.get(name, 0) + 1

    def compute(self, process_group=None) -> dict[str, float]:
        """The mean of every scalar over everything added on every process since the last [`reset`]."""
        names = sorted(self._sums)
        if not names:
            return {}
        device = next((v.device for v in self._sums.values() if v.device.type != "cpu"), torch.device("cpu"))
        sums = torch.stack([self._sums[name].reshape(()).to(device) for name in names]).double()
        counts = torch.tensor([self._counts[name] for name in names], dtype=torch.float64, device=device)
        totals = all_reduce_over_processes(torch.cat([sums, counts]), process_group=process_group).cpu()
        return {name: float(totals[i] / totals[len(names) + i].clamp_min(1)) for i, name in enumerate(names)}

    def reset(self):
        self._sums.clear()
        self._counts.clear()
