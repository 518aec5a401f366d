"""Dead-run detection: tell a collapsed (constant-output) autoencoder from one that learned something.

A tokenizer run can "succeed" (exit 0, finite loss, 100 % code usage under Sinkhorn) while its decoder has died and
paints the same image for every input. Three symptoms, checked on the evaluation set, give it away:

* the reconstructions (nearly) do not vary across images: their per-pixel spread across images is a tiny fraction
  of the originals' (`reconstruction_spread` below `min_reconstruction_spread`);
* the PSNR is no better than predicting the mean image of the evaluation set for every input (the best constant
  prediction in squared error), by less than `min_psnr_gain_db`;
* the evaluation images use only a handful of codes (fewer than `min_codes_used` distinct codes).

Front ends (`examples/run_train.py`, your own loop) compute the baseline once with [`mean_image_psnr`], accumulate
the spread during evaluation with [`ReconstructionSpread`] (reducible over processes), and call
[`diagnose_collapse`], whose [`CollapseDiagnosis`] holds the verdict, the reasons and the numbers for `metrics.json`.

A run can also *diverge*: its loss turns NaN / Inf, or its encoder's latents grow without bound (a plain-VQ model
trained with the `"ce"` quantization loss does: nothing pulls the latents back to their codes, see docs/training.md,
"Reproducing Table 2"). Latents that leave the region the codebook covers by a wide margin (more than
`MAX_LATENT_CODEBOOK_RATIO` times its largest coordinate) show it long before float32's limit: from there nearly
every latent is assigned by its direction alone to a code on the codebook's edge, and nothing pulls it back. That is
checked on every training
step, before the update is applied: [`divergence_signal`] packs the numbers into one small tensor (no host
synchronization), [`reduce_divergence_signal`] takes their maximum over processes (one tiny all-reduce, so every rank
reaches the same verdict at the same step and they stop together), and [`diagnose_divergence`] turns them into a
[`DivergenceDiagnosis`].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = [
    "MIN_PSNR_GAIN_DB",
    "MIN_RECONSTRUCTION_SPREAD",
    "MIN_CODES_USED",
    "mean_image_psnr",
    "reconstruction_spread",
    "ReconstructionSpread",
    "CollapseDiagnosis",
    "diagnose_collapse",
    "MAX_TRAINING_LATENT_MAGNITUDE",
    "MAX_LATENT_CODEBOOK_RATIO",
    "divergence_signal",
    "reduce_divergence_signal",
    "DivergenceDiagnosis",
    "diagnose_divergence",
]

# A run must beat the mean image by this many dB (healthy demo runs beat it by 6 to 10 dB; dead ones by < 0.1 dB).
MIN_PSNR_GAIN_DB = 1.0
# Reconstructions must vary across images at least this much relative to the originals (healthy: about 0.9; a dead
# decoder: below 1e-3).
MIN_RECONSTRUCTION_SPREAD = 0.05
# The evaluation images must use at least this many distinct codes (when the codebook has more).
MIN_CODES_USED = 4
#: Latents larger than this in magnitude mark a training run as diverged. Healthy models keep theirs within about
#: 1 to 100 (the MNIST and ImageNet presets: below 30); at 1e6, float32's spacing (0.06) is as coarse as the
#: differences between codes, so the straight-through latents `z + (c - z)` no longer carry their codes, and a run
#: whose latents got there only grows further (a `"ce"` VQ run: x10 every ~10 steps, see docs/training.md). The
#: quantizer itself refuses latents beyond `optvq_hf.validation.MAX_FEATURE_MAGNITUDE` (1e15), far above this.
MAX_TRAINING_LATENT_MAGNITUDE = 1e6
#: Latents whose largest coordinate exceeds this many times the codebook's largest coordinate mark a training run as
#: diverged: they have left the region the codes cover, so nearest-code assignment depends on their direction alone
#: (each lands on a code at the codebook's edge: 99 % of them at this ratio in the run below) and the quantized
#: latent no longer follows the latent. Healthy runs measured stay within 3.2 (OT-VAE at the Table 2 recipe's peak
#: learning rate; OptVQ, VQ with the `"l2"` loss and `make demo` within 1.9; a collapsed VQ run whose used codes moved
#: out with its latents 1.8), so the limit keeps a 30x margin; the `"ce"` VQ baseline of docs/training.md,
#: "Reproducing Table 2", passes it 37 steps before float32's limit above, and never comes back.
MAX_LATENT_CODEBOOK_RATIO = 100.0


def _unit_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] or floating-point pixel values in [-1, 1] -> float64 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.double() / 255.0
    if not images.is_floating_point():
        raise ValueError(f"Images must be uint8 in [0, 255] or floating point in [-1, 1], got {images.dtype}.")
    return (images.double().clamp(-1, 1) + 1) / 2


@torch.no_grad()
def mean_image_psnr(images: torch.Tensor, batch_size: int = 256, max_mse_floor: float = 1e-10) -> float:
    """Mean per-image PSNR (dB, over [0, 1] pixels) of predicting the per-pixel mean image for every image.

    This is the score of the best constant prediction in squared error: a model that ignores its input cannot do
    better (up to the difference between the mean of per-image PSNRs and the PSNR of the mean error). It is the
    baseline a trained autoencoder must clearly beat; it is computed with the same per-image PSNR as
    [`~optvq_hf.training.per_image_psnr`].

    Args:
        images (`torch.Tensor` of shape `(N, C, H, W)`): uint8 images in [0, 255] or pixel values in [-1, 1];
            at least two images.
        batch_size (`int`, defaults to 256): images converted to float64 at a time.
        max_mse_floor (`float`, defaults to 1e-10): floor of each image's mean squared error.
    """
    if images.ndim != 4 or images.shape[0] < 2:
        raise ValueError(f"`images` must have shape (N >= 2, C, H, W), got {tuple(images.shape)}.")
    total = images.shape[0]
    mean = torch.zeros(images.shape[1:], dtype=torch.float64)
    for start in range(0, total, batch_size):
        mean += _unit_pixels(images[start:start + batch_size].cpu()).sum(0)
    mean /= total
    psnr_sum = 0.0
    for start in range(0, total, batch_size):
        batch = _unit_pixels(images[start:start + batch_size].cpu())
        mse = (batch - mean).pow(2).flatten(1).mean(1).clamp_min(max_mse_floor)
        psnr_sum += float((-10.0 * torch.log10(mse)).sum())
    return psnr_sum / total


def reconstruction_spread(originals: torch.Tensor, reconstructions: torch.Tensor) -> float:
    """How much the reconstructions of a batch vary across images, relative to the originals (one batch).

    `sqrt(mean over pixels of Var_images(reconstruction)) / sqrt(mean over pixels of Var_images(original))`, over
    [0, 1] pixels: about 1 when the reconstructions differ from each other as much as the images do, 0 for a
    constant output. Useful as a cheap live signal on training batches (an untrained network starts near 0 too).
    """
    spread = ReconstructionSpread()
    spread.update(originals, reconstructions)
    return spread.ratio


@dataclass
class ReconstructionSpread:
    """Accumulates [`reconstruction_spread`] over many batches (and processes) from per-pixel sums.

    Call `update(originals, reconstructions, mask)` for every evaluation batch (pixel values in [-1, 1]); with
    several processes, `reduce_(lambda t: accelerator.reduce(t, "sum"))` sums the statistics of all ranks; `ratio`
    is then the spread over the whole evaluation set (`nan` with fewer than two images).
    """

    sums: torch.Tensor | None = None  # (5, C, H, W): sum and sum of squares of originals and reconstructions, count
    num_images: float = 0.0

    @torch.no_grad()
    def update(self, originals: torch.Tensor, reconstructions: torch.Tensor, mask: torch.Tensor | None = None):
        """Add a batch `(B, C, H, W)`; `mask` `(B,)` marks the images to count (padding excluded)."""
        if originals.shape != reconstructions.shape or originals.ndim != 4:
            raise ValueError(f"Expected originals and reconstructions of the same shape (B, C, H, W), got "
                             f"{tuple(originals.shape)} and {tuple(reconstructions.shape)}.")
        original, reconstruction = _unit_pixels(originals), _unit_pixels(reconstructions)
        weight = torch.ones(original.shape[0], dtype=torch.float64, device=original.device) if mask is None else \
            mask.to(device=original.device, dtype=torch.float64)
        weight = weight.view(-1, 1, 1, 1)
        batch = torch.stack([
            (weight * original).sum(0), (weight * original.pow(2)).sum(0),
            (weight * reconstruction).sum(0), (weight * reconstruction.pow(2)).sum(0),
            weight.sum(0).expand_as(original[0]),
        ])
        self.sums = batch if self.sums is None else self.sums + batch.to(self.sums.device)

    def reduce_(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> ReconstructionSpread:
        """Replace the statistics by `reduce_sum(statistics)` (e.g. a sum over processes); returns `self`."""
        if self.sums is not None:
            self.sums = reduce_sum(self.sums)
        return self

    @property
    def ratio(self) -> float:
        if self.sums is None:
            return float("nan")
        count = float(self.sums[4].flatten()[0])
        if count < 2:
            return float("nan")
        variances = []
        for first in (0, 2):
            mean = self.sums[first] / count
            variances.append(float((self.sums[first + 1] / count - mean.pow(2)).clamp_min(0).mean()))
        original, reconstruction = variances
        if original <= 0:
            return float("nan")
        return math.sqrt(reconstruction / original)


@dataclass
class CollapseDiagnosis:
    """The verdict of [`diagnose_collapse`] and the numbers behind it.

    Attributes:
        collapsed (`bool`): a symptom of a dead / collapsed run was found.
        reasons (`list[str]`): one sentence per symptom found (empty when healthy).
        psnr (`float`, *optional*): the evaluation PSNR (dB).
        mean_image_psnr (`float`, *optional*): the PSNR of predicting the evaluation set's mean image (dB).
        reconstruction_spread (`float`, *optional*): spread of the reconstructions across images relative to the
            originals' (0: constant output, about 1: as varied as the images).
        codes_used (`int`, *optional*): distinct codes used by the evaluation images.
        codebook_size (`int`, *optional*): the number of codes.
    """

    collapsed: bool
    reasons: list[str] = field(default_factory=list)
    psnr: float | None = None
    mean_image_psnr: float | None = None
    reconstruction_spread: float | None = None
    codes_used: int | None = None
    codebook_size: int | None = None

    @property
    def psnr_gain_db(self) -> float | None:
        """PSNR above the mean-image baseline (dB)."""
        if self.psnr is None or self.mean_image_psnr is None:
            return None
        return self.psnr - self.mean_image_psnr

    def to_dict(self) -> dict:
        """The flags and numbers for `metrics.json`: `collapsed`, `collapse_reasons`, `mean_image_psnr`,
        `psnr_gain_over_mean_image`, `reconstruction_spread`, `eval_codes_used` (absent numbers left out)."""
        out = {"collapsed": self.collapsed, "collapse_reasons": list(self.reasons)}
        for key, value in (("mean_image_psnr", self.mean_image_psnr), ("psnr_gain_over_mean_image", self.psnr_gain_db),
                           ("reconstruction_spread", self.reconstruction_spread), ("eval_codes_used", self.codes_used)):
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                out[key] = value
        return out

    def message(self) -> str:
        """One paragraph for logs: the verdict and why."""
        if not self.collapsed:
            gain = self.psnr_gain_db
            extra = f" ({gain:+.1f} dB over the mean-image baseline)" if gain is not None else ""
            return f"Training looks healthy: reconstructions depend on their inputs{extra}."
        return ("COLLAPSED RUN: the model does not reconstruct its inputs (a dead network or a far too short run); "
                "its outputs are not usable. " + " ".join(self.reasons))


def diagnose_collapse(
    psnr: float | None = None,
    mean_image_psnr: float | None = None,
    reconstruction_spread: float | None = None,
    code_counts: torch.Tensor | None = None,
    min_psnr_gain_db: float = MIN_PSNR_GAIN_DB,
    min_reconstruction_spread: float = MIN_RECONSTRUCTION_SPREAD,
    min_codes_used: int = MIN_CODES_USED,
) -> CollapseDiagnosis:
    """Decide whether a trained autoencoder collapsed, from evaluation-set numbers. Every argument is optional; a
    symptom is only checked when its numbers are given (and finite).

    Args:
        psnr (`float`, *optional*): mean per-image PSNR of the reconstructions (dB).
        mean_image_psnr (`float`, *optional*): the baseline from [`mean_image_psnr`] on the same images.
        reconstruction_spread (`float`, *optional*): [`ReconstructionSpread.ratio`] on the same images.
        code_counts (`torch.Tensor` of shape `(codebook_size,)`, *optional*): how often each code was used.
        min_psnr_gain_db (`float`, defaults to `MIN_PSNR_GAIN_DB` = 1.0): collapsed when `psnr` does not beat the
            baseline by this much.
        min_reconstruction_spread (`float`, defaults to `MIN_RECONSTRUCTION_SPREAD` = 0.05): collapsed below.
        min_codes_used (`int`, defaults to `MIN_CODES_USED` = 4): collapsed when fewer distinct codes are used
            (only checked when the codebook has more codes than that).
    """
    def finite(value):
        return value is not None and math.isfinite(value)

    reasons = []
    if finite(reconstruction_spread) and reconstruction_spread < min_reconstruction_spread:
        reasons.append(f"Reconstructions are (nearly) the same for every image: their spread across images is "
                       f"{reconstruction_spread:.3g} of the originals' (healthy runs: about 1; threshold "
                       f"{min_reconstruction_spread:g}).")
    if finite(psnr) and finite(mean_image_psnr) and psnr < mean_image_psnr + min_psnr_gain_db:
        reasons.append(f"PSNR {psnr:.2f} dB is no better than predicting the mean image for every input "
                       f"({mean_image_psnr:.2f} dB; a trained model must beat it by at least {min_psnr_gain_db:g} dB).")
    codes_used = codebook_size = None
    if code_counts is not None:
        codebook_size = int(code_counts.numel())
        codes_used = int((code_counts > 0).sum())
        if codebook_size > min_codes_used and code_counts.sum() > 0 and codes_used < min_codes_used:
            reasons.append(f"The evaluation images use only {codes_used} of {codebook_size} codes.")
    return CollapseDiagnosis(
        collapsed=bool(reasons), reasons=reasons, psnr=psnr if finite(psnr) else None,
        mean_image_psnr=mean_image_psnr if finite(mean_image_psnr) else None,
        reconstruction_spread=reconstruction_spread if finite(reconstruction_spread) else None,
        codes_used=codes_used, codebook_size=codebook_size,
    )


@torch.no_grad()
def divergence_signal(loss: torch.Tensor | None, latents: torch.Tensor | None = None,
                      device: torch.device | str | None = None,
                      codebook: torch.Tensor | None = None) -> torch.Tensor:
    """The per-step divergence numbers of one process, as a float32 tensor `(3,)` on the loss's device, computed
    without a host synchronization: `[status, largest latent magnitude, latent-to-codebook ratio]`, status 0 for a
    finite loss, 1 for a NaN / Inf loss, 2 when the forward pass failed (`loss=None`: the model refused its latents;
    the magnitude and the ratio are then `inf`). The magnitude is `inf` when a latent is NaN or Inf, 0 without
    `latents`. The ratio is the largest latent magnitude over the codebook's largest coordinate magnitude (0 without
    a `codebook`, or when every code is zero).

    Args:
        loss (`torch.Tensor` or `None`): the step's (scalar) training loss; `None` when the forward pass raised.
        latents (`torch.Tensor`, *optional*): the encoder's pre-quantization latents of the step
            (`OptVQModelOutput.latents`).
        device (*optional*): where to put the signal when `loss` is `None`.
        codebook (`torch.Tensor`, *optional*): the codes in use (`model.quantizer.codebook`, identical on every
            process).
    """
    if loss is None:
        return torch.tensor([2.0, math.inf, math.inf], device=device)
    loss = loss.detach().float().reshape(-1)
    bad_loss = (~torch.isfinite(loss)).any().float()
    if latents is None or latents.numel() == 0:
        magnitude = torch.zeros((), device=loss.device)
    else:
        magnitude = latents.detach().abs().amax().float().to(loss.device)
        magnitude = torch.where(torch.isfinite(magnitude), magnitude, torch.full_like(magnitude, math.inf))
    ratio = torch.zeros((), device=loss.device)
    if codebook is not None and codebook.numel() > 0:
        scale = codebook.detach().abs().amax().float().to(loss.device)
        ratio = torch.where(scale > 0, magnitude / scale.clamp_min(torch.finfo(torch.float32).tiny), ratio)
    return torch.stack([bad_loss, magnitude, ratio])


def reduce_divergence_signal(signal: torch.Tensor, process_group=None) -> torch.Tensor:
    """The element-wise maximum of every process's [`divergence_signal`] (an all-reduce of three numbers when
    `torch.distributed` is initialized with several processes; `signal` itself otherwise), so that all processes
    get the same verdict from [`diagnose_divergence`] at the same step. Every process must call it at that step."""
    return all_reduce_over_processes(signal.clone(), "max", process_group)


def all_reduce_over_processes(tensor: torch.Tensor, op: str = "sum", process_group=None) -> torch.Tensor:
    """`tensor` reduced in place (`op`: `"sum"` or `"max"`) over the processes of `process_group` when
    `torch.distributed` runs with several of them; `tensor` unchanged otherwise. Every process must call it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=process_group)
    return tensor


@dataclass
class DivergenceDiagnosis:
    """The verdict of [`diagnose_divergence`] and the numbers behind it.

    Attributes:
        diverged (`bool`): the loss was not finite or the latents exceeded the limit.
        reasons (`list[str]`): one sentence per symptom found (empty when healthy).
        step (`int`, *optional*): the optimizer step whose forward pass showed the symptom (its update is not
            applied by `examples/run_train.py`, which stops there).
        latent_magnitude (`float`, *optional*): the largest latent magnitude (`inf` for NaN / Inf latents).
        max_latent_magnitude (`float`): the limit it was compared with.
        latent_codebook_ratio (`float`, *optional*): the largest latent magnitude over the codebook's largest
            coordinate magnitude.
        max_latent_codebook_ratio (`float`): the limit that ratio was compared with.
    """

    diverged: bool
    reasons: list[str] = field(default_factory=list)
    step: int | None = None
    latent_magnitude: float | None = None
    max_latent_magnitude: float = MAX_TRAINING_LATENT_MAGNITUDE
    latent_codebook_ratio: float | None = None
    max_latent_codebook_ratio: float = MAX_LATENT_CODEBOOK_RATIO

    def to_dict(self) -> dict:
        """The flags and numbers for `metrics.json`: `diverged`, `divergence_reasons` and, for a diverged run,
        `diverged_at_step`, `divergence_latent_magnitude` and `divergence_latent_codebook_ratio` (strings for Inf,
        which JSON cannot hold)."""
        out = {"diverged": self.diverged, "divergence_reasons": list(self.reasons)}
        if self.diverged:
            out["diverged_at_step"] = self.step
            for key, value in (("divergence_latent_magnitude", self.latent_magnitude),
                               ("divergence_latent_codebook_ratio", self.latent_codebook_ratio)):
                if value is not None:
                    out[key] = value if math.isfinite(value) else str(value)
        return out

    def message(self) -> str:
        """One paragraph for logs: the verdict and why."""
        if not self.diverged:
            return "Training is numerically stable: finite loss, bounded latents."
        where = f" at step {self.step}" if self.step is not None else ""
        return (f"DIVERGED RUN{where}: training blew up and was stopped before applying that step's update; the "
                "weights it reached are not a usable tokenizer. " + " ".join(self.reasons))


def diagnose_divergence(loss_finite: bool = True, latent_magnitude: float | None = None, step: int | None = None,
                        max_latent_magnitude: float = MAX_TRAINING_LATENT_MAGNITUDE,
                        forward_failed: bool = False, latent_codebook_ratio: float | None = None,
                        max_latent_codebook_ratio: float = MAX_LATENT_CODEBOOK_RATIO) -> DivergenceDiagnosis:
    """Decide whether a training step diverged.

    Args:
        loss_finite (`bool`, defaults to `True`): whether the step's loss was finite (on every process).
        latent_magnitude (`float`, *optional*): the largest latent magnitude of the step (over every process);
            NaN counts as Inf.
        step (`int`, *optional*): the step, for the report.
        max_latent_magnitude (`float`, defaults to `MAX_TRAINING_LATENT_MAGNITUDE` = 1e6): diverged beyond it;
            `0` or `inf` checks the loss only.
        forward_failed (`bool`, defaults to `False`): the forward pass raised on a process (the model refused
            latents that are NaN, Inf or beyond `optvq_hf.validation.MAX_FEATURE_MAGNITUDE`).
        latent_codebook_ratio (`float`, *optional*): the largest latent magnitude over the codebook's largest
            coordinate magnitude (over every process); not checked when not given (or 0).
        max_latent_codebook_ratio (`float`, defaults to `MAX_LATENT_CODEBOOK_RATIO` = 100): diverged beyond it; `0`
            or `inf` turns this check off.

    A [`divergence_signal`] (reduced over processes) `signal` gives the arguments:
    `diagnose_divergence(signal[0] == 0, signal[1], step, forward_failed=signal[0] == 2,
    latent_codebook_ratio=signal[2])`.
    """
    reasons = []
    if forward_failed:
        reasons.append("The model refused the latents its encoder computed (NaN, Inf or beyond 1e15 in magnitude).")
    elif not loss_finite:
        reasons.append("The training loss is NaN or Inf.")
    if latent_magnitude is not None and math.isnan(latent_magnitude):
        latent_magnitude = math.inf
    too_large = latent_magnitude is not None and 0 < max_latent_magnitude < latent_magnitude and not forward_failed
    if too_large:
        reasons.append(
            f"The encoder's latents reached a magnitude of {latent_magnitude:.3g} (limit {max_latent_magnitude:.3g}; "
            "healthy runs stay within about 1 to 100): they grow without bound, usually a learning rate too high "
            "for this model or a quantization loss that does not pull the latents to their codes (`\"ce\"`).")
    if latent_codebook_ratio is not None and math.isnan(latent_codebook_ratio):
        latent_codebook_ratio = math.inf
    if (latent_codebook_ratio is not None and 0 < max_latent_codebook_ratio < latent_codebook_ratio
            and not forward_failed and not too_large):  # one reason for the latents: the stronger one
        reasons.append(
            f"The encoder's latents reached {latent_codebook_ratio:.3g} times the codebook's largest coordinate "
            f"(limit {max_latent_codebook_ratio:.3g}; healthy runs stay within about 3): they left the region the codes "
            "cover, so each is assigned by its direction alone to a code at the codebook's edge, and nothing "
            "pulls them back. Usually a learning rate too high for this model or a quantization loss that does not pull the "
            "latents to their codes (`\"ce\"`).")
    return DivergenceDiagnosis(diverged=bool(reasons), reasons=reasons, step=step, latent_magnitude=latent_magnitude,
                               max_latent_magnitude=max_latent_magnitude, latent_codebook_ratio=latent_codebook_ratio,
                               max_latent_codebook_ratio=max_latent_codebook_ratio)
