"""Dead-run detection (optvq_hf.training.diagnostics): the mean-image baseline, the reconstructions' spread across
images, and the collapse verdict, checked against independent float64 / NumPy computations."""

import math

import numpy as np
import pytest
import torch

from optvq_hf.training import (
    MIN_PSNR_GAIN_DB,
    CollapseDiagnosis,
    ReconstructionSpread,
    diagnose_collapse,
    mean_image_psnr,
    per_image_psnr,
    reconstruction_spread,
)


def _images(seed=0, count=10, shape=(3, 8, 8)):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8))


def test_mean_image_psnr_matches_numpy_and_per_image_psnr():
    images = _images()
    unit = images.numpy().astype(np.float64) / 255
    mse = ((unit - unit.mean(0)) ** 2).reshape(len(unit), -1).mean(1)
    expected = float(np.mean(-10 * np.log10(mse)))
    assert mean_image_psnr(images) == pytest.approx(expected, abs=1e-9)
    assert mean_image_psnr(images, batch_size=3) == pytest.approx(expected, abs=1e-9)  # chunking changes nothing
    # Float pixel values in [-1, 1] give the same number, and it is what per_image_psnr scores for the mean image.
    pixels = images.float() / 127.5 - 1
    assert mean_image_psnr(pixels) == pytest.approx(expected, abs=1e-4)
    mean = pixels.mean(0, keepdim=True).expand_as(pixels)
    assert float(per_image_psnr(mean, pixels).mean()) == pytest.approx(expected, abs=1e-3)
    with pytest.raises(ValueError, match="N >= 2"):
        mean_image_psnr(images[:1])
    with pytest.raises(ValueError, match="uint8"):
        mean_image_psnr(images.long())


def test_reconstruction_spread_constant_identical_and_scaled():
    pixels = _images(1, count=16).float() / 127.5 - 1
    assert reconstruction_spread(pixels, pixels) == pytest.approx(1.0)
    constant = pixels.mean(0, keepdim=True).expand_as(pixels).clone()
    assert reconstruction_spread(pixels, constant) == pytest.approx(0.0, abs=1e-6)
    # Deviations from the mean image halved: half the spread (reference computed in NumPy).
    halved = constant + 0.5 * (pixels - constant)
    unit, rec = (pixels.double().numpy() + 1) / 2, (halved.double().numpy() + 1) / 2
    expected = math.sqrt(rec.var(0).mean() / unit.var(0).mean())
    assert reconstruction_spread(pixels, halved) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.5, rel=1e-5)


def test_reconstruction_spread_accumulates_masks_and_reduces_like_one_batch():
    pixels = _images(2, count=12).float() / 127.5 - 1
    noisy = (pixels + 0.3 * torch.randn(pixels.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    whole = reconstruction_spread(pixels, noisy)
    in_parts = ReconstructionSpread()
    for start in range(0, 12, 5):
        in_parts.update(pixels[start:start + 5], noisy[start:start + 5])
    assert in_parts.ratio == pytest.approx(whole, rel=1e-9)
    # Padded batches: masked rows do not count.
    padded = ReconstructionSpread()
    padded.update(torch.cat([pixels, pixels[:3]]), torch.cat([noisy, -noisy[:3]]),
                  mask=torch.tensor([True] * 12 + [False] * 3))
    assert padded.ratio == pytest.approx(whole, rel=1e-9)
    # Two "ranks" with half the images each, summed by reduce_, equal one process with all images.
    first, second = ReconstructionSpread(), ReconstructionSpread()
    first.update(pixels[:6], noisy[:6])
    second.update(pixels[6:], noisy[6:])
    first.reduce_(lambda sums: sums + second.sums)
    assert first.ratio == pytest.approx(whole, rel=1e-9)
    assert math.isnan(ReconstructionSpread().ratio)
    single = ReconstructionSpread()
    single.update(pixels[:1], noisy[:1])
    assert math.isnan(single.ratio)  # one image has no spread
    with pytest.raises(ValueError, match="same shape"):
        single.update(pixels[:2], noisy[:1])


def test_diagnose_collapse_flags_each_symptom_and_passes_a_healthy_run():
    counts = torch.zeros(64)
    counts[:50] = 10
    healthy = diagnose_collapse(psnr=22.0, mean_image_psnr=14.6, reconstruction_spread=0.9, code_counts=counts)
    assert not healthy.collapsed and healthy.reasons == []
    assert healthy.psnr_gain_db == pytest.approx(7.4)
    assert healthy.to_dict() == {"collapsed": False, "collapse_reasons": [], "mean_image_psnr": 14.6,
                                 "psnr_gain_over_mean_image": pytest.approx(7.4), "reconstruction_spread": 0.9,
                                 "eval_codes_used": 50}
    assert "healthy" in healthy.message()

    constant = diagnose_collapse(psnr=22.0, mean_image_psnr=14.6, reconstruction_spread=1e-6)
    assert constant.collapsed and "same for every image" in constant.reasons[0]
    no_gain = diagnose_collapse(psnr=14.6 + MIN_PSNR_GAIN_DB / 2, mean_image_psnr=14.6, reconstruction_spread=0.9)
    assert no_gain.collapsed and "mean image" in no_gain.reasons[0]
    few = torch.zeros(64)
    few[:3] = 100
    few_codes = diagnose_collapse(code_counts=few)
    assert few_codes.collapsed and "only 3 of 64 codes" in few_codes.reasons[0]
    assert "COLLAPSED" in few_codes.message()
    # Thresholds are arguments; missing or non-finite numbers are not checked.
    assert not diagnose_collapse(psnr=15.0, mean_image_psnr=14.6, min_psnr_gain_db=0.1).collapsed
    assert not diagnose_collapse(psnr=10.0, mean_image_psnr=None, reconstruction_spread=float("nan")).collapsed
    assert not diagnose_collapse(code_counts=torch.tensor([5.0, 0.0, 0.0])).collapsed  # codebook of 3: not checked
    assert isinstance(diagnose_collapse(), CollapseDiagnosis)


def test_training_docs_health_snippet_runs(tmp_path, monkeypatch):
    """docs/training.md, "Is my run healthy?": its Python blocks (collapse, divergence) run as written."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    section = text.split("## Is my run healthy?", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert len(blocks) == 2 and "diagnose_collapse" in blocks[0] and "diagnose_divergence" in blocks[1]
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "<docs/training.md>", "exec"), {"__name__": "__docs__"})


def test_divergence_signal_and_verdict():
    """The per-step divergence numbers (no host synchronization until read) and the verdict built from them."""
    from optvq_hf.training import (
        MAX_TRAINING_LATENT_MAGNITUDE, DivergenceDiagnosis, diagnose_divergence, divergence_signal,
        reduce_divergence_signal,
    )

    latents = torch.tensor([[1.0, -7.0], [3.0, 2.0]])
    assert divergence_signal(torch.tensor(0.5), latents).tolist() == [0.0, 7.0, 0.0]
    assert divergence_signal(torch.tensor(float("nan")), latents).tolist() == [1.0, 7.0, 0.0]
    assert divergence_signal(torch.tensor(0.5), latents.new_tensor([1.0, float("nan")])).tolist() == [0.0, math.inf,
                                                                                                     0.0]
    assert divergence_signal(torch.tensor(0.5), latents.new_tensor([-float("inf")])).tolist() == [0.0, math.inf, 0.0]
    assert divergence_signal(torch.tensor(0.5)).tolist() == [0.0, 0.0, 0.0]
    assert divergence_signal(None).tolist() == [2.0, math.inf, math.inf]  # the forward pass failed
    assert reduce_divergence_signal(torch.tensor([0.0, 3.0, 1.0])).tolist() == [0.0, 3.0, 1.0]  # one process: itself

    healthy = diagnose_divergence(True, 50.0, step=3)
    assert not healthy.diverged and healthy.to_dict() == {"diverged": False, "divergence_reasons": []}
    assert "stable" in healthy.message()
    at_limit = diagnose_divergence(True, MAX_TRAINING_LATENT_MAGNITUDE, step=3)
    assert MAX_TRAINING_LATENT_MAGNITUDE == 1e6 and not at_limit.diverged  # beyond the limit, not at it
    exploded = diagnose_divergence(True, 2e6, step=7)
    assert exploded.diverged and exploded.to_dict()["diverged_at_step"] == 7
    assert exploded.to_dict()["divergence_latent_magnitude"] == 2e6 and "magnitude of 2e+06" in exploded.reasons[0]
    assert exploded.message().startswith("DIVERGED RUN at step 7: ")
    assert not diagnose_divergence(True, 2e6, max_latent_magnitude=1e7).diverged
    assert not diagnose_divergence(True, 1e30, max_latent_magnitude=0).diverged  # 0: the loss only
    nan_loss = diagnose_divergence(False, 3.0, step=2)
    assert nan_loss.diverged and nan_loss.reasons == ["The training loss is NaN or Inf."]
    nan_latents = diagnose_divergence(True, float("nan"), step=2)
    assert nan_latents.diverged and nan_latents.to_dict()["divergence_latent_magnitude"] == "inf"  # JSON-safe
    failed = diagnose_divergence(False, math.inf, step=2, forward_failed=True)
    assert failed.diverged and len(failed.reasons) == 1 and failed.reasons[0].startswith("The model refused")
    assert isinstance(diagnose_divergence(), DivergenceDiagnosis) and not diagnose_divergence().diverged


def test_latents_far_outside_the_codebook_are_a_divergence():
    """The third number of the signal: the largest latent over the codebook's largest coordinate (by hand below), and
    the verdict beyond `MAX_LATENT_CODEBOOK_RATIO` (100) times; a magnitude past 1e6 gives its own reason instead."""
    from optvq_hf.training import MAX_LATENT_CODEBOOK_RATIO, diagnose_divergence, divergence_signal

    latents = torch.tensor([[1.0, -7.0], [3.0, 2.0]])
    codebook = torch.tensor([[0.0625, -0.03125], [0.0, 0.015625]])   # largest coordinate 1/16: ratio 112
    assert divergence_signal(torch.tensor(0.5), latents, codebook=codebook).tolist() == [0.0, 7.0, 112.0]
    assert divergence_signal(torch.tensor(0.5), latents, codebook=torch.zeros(2, 2)).tolist() == [0.0, 7.0, 0.0]
    assert divergence_signal(torch.tensor(0.5), latents.new_tensor([float("nan")]),
                             codebook=codebook).tolist() == [0.0, math.inf, math.inf]
    assert divergence_signal(torch.tensor(0.5), None, codebook=codebook).tolist() == [0.0, 0.0, 0.0]

    assert MAX_LATENT_CODEBOOK_RATIO == 100.0
    assert not diagnose_divergence(True, 7.0, step=3, latent_codebook_ratio=100.0).diverged  # at the limit: healthy
    outside = diagnose_divergence(True, 7.0, step=3, latent_codebook_ratio=112.0)
    assert outside.diverged and len(outside.reasons) == 1 and "112 times the codebook's largest" in outside.reasons[0]
    assert outside.to_dict() == {"diverged": True, "divergence_reasons": outside.reasons, "diverged_at_step": 3,
                                 "divergence_latent_magnitude": 7.0, "divergence_latent_codebook_ratio": 112.0}
    assert not diagnose_divergence(True, 7.0, latent_codebook_ratio=112.0, max_latent_codebook_ratio=200).diverged
    assert diagnose_divergence(True, 7.0, latent_codebook_ratio=14.0, max_latent_codebook_ratio=10).diverged
    assert not diagnose_divergence(True, 7.0, latent_codebook_ratio=1e9, max_latent_codebook_ratio=0).diverged
    assert not diagnose_divergence(True, 7.0, latent_codebook_ratio=0.0).diverged  # no codebook: not checked
    assert diagnose_divergence(True, 7.0, latent_codebook_ratio=float("nan")).to_dict()[
        "divergence_latent_codebook_ratio"] == "inf"
    both = diagnose_divergence(True, 2e6, step=5, latent_codebook_ratio=1e5)
    assert len(both.reasons) == 1 and "magnitude of 2e+06" in both.reasons[0]
    nan_loss = diagnose_divergence(False, 7.0, step=5, latent_codebook_ratio=112.0)
    assert len(nan_loss.reasons) == 2 and "NaN" in nan_loss.reasons[0] and "codebook" in nan_loss.reasons[1]
    failed = diagnose_divergence(False, math.inf, forward_failed=True, latent_codebook_ratio=math.inf)
    assert len(failed.reasons) == 1 and failed.reasons[0].startswith("The model refused")
