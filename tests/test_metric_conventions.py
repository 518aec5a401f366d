"""The paper's score convention (`convention="paper"`: pyiqa's Y-channel PSNR and SSIM, as the original code
evaluates) against float64 references written here from the conversions' definitions, and golden values by hand."""

import math

import pytest
import torch

import optvq_hf.metrics as metrics
from optvq_hf.metrics.functional import per_image_psnr, per_image_ssim, rgb_to_y


def _pair(seed=0, shape=(3, 3, 24, 24)):
    generator = torch.Generator().manual_seed(seed)
    references = torch.rand(shape, generator=generator, dtype=torch.float64)
    predictions = (references + 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    return predictions, references


def reference_paper_psnr(x, y):
    """pyiqa psnr(test_y_channel=True, color_space="ycbcr"): BT.601 studio-swing Y in [0, 255] units."""
    def luma(images):
        if images.shape[1] == 1:
            return images[:, 0] * 255
        r, g, b = images.unbind(1)
        return 16 + 65.481 * r + 128.553 * g + 24.966 * b
    mse = ((luma(x) - luma(y)) ** 2).mean(dim=(1, 2))
    return 10 * torch.log10(255.0**2 / mse)


def reference_paper_ssim(x, y):
    """pyiqa's default ssim: YIQ luma x 255 rounded, 11x11 Gaussian (sigma 1.5) valid windows, data range 255,
    contrast-structure term clipped at 0, mean over the map."""
    def luma(images):
        if images.shape[1] == 1:
            return (images * 255).round()
        r, g, b = images.unbind(1)
        return (255 * (0.299 * r + 0.587 * g + 0.114 * b)).round()[:, None]
    offsets = torch.arange(11, dtype=torch.float64) - 5
    yy, xx = torch.meshgrid(offsets, offsets, indexing="ij")
    window = torch.exp(-(xx**2 + yy**2) / (2 * 1.5**2))
    window = (window / window.sum())[None, None]
    a, b = luma(x), luma(y)
    conv = lambda t: torch.nn.functional.conv2d(t, window)  # noqa: E731
    mu_a, mu_b = conv(a), conv(b)
    var_a, var_b, cov = conv(a * a) - mu_a**2, conv(b * b) - mu_b**2, conv(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    cs = ((2 * cov + c2) / (var_a + var_b + c2)).clamp_min(0)
    return ((2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1) * cs).mean(dim=(1, 2, 3))


def test_golden_values_by_hand():
    # Gray 0.5 vs 0.6: RGB error 0.1 -> 20 dB; the YCbCr Y error is 0.1 * 219/255 -> 20 + 20 log10(255/219) dB.
    predictions = torch.full((1, 3, 16, 16), 0.5, dtype=torch.float64)
    references = torch.full((1, 3, 16, 16), 0.6, dtype=torch.float64)
    assert float(per_image_psnr(predictions, references)) == pytest.approx(20.0, abs=1e-9)
    paper = float(per_image_psnr(predictions, references, convention="paper"))
    assert paper == pytest.approx(20 + 20 * math.log10(255 / 219), abs=1e-9)  # 21.32 dB: the ~1.3 dB shift
    assert rgb_to_y(torch.ones(1, 3, 2, 2)).unique().item() == pytest.approx(235 / 255)
    assert rgb_to_y(torch.zeros(1, 3, 2, 2)).unique().item() == pytest.approx(16 / 255)
    assert rgb_to_y(torch.ones(1, 3, 2, 2), "yiq").unique().item() == pytest.approx(1.0)


@pytest.mark.parametrize("channels", [3, 1])
def test_paper_convention_matches_the_reference(channels):
    predictions, references = _pair(shape=(4, channels, 24, 24))
    torch.testing.assert_close(per_image_psnr(predictions, references, convention="paper"),
                               reference_paper_psnr(predictions, references), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(per_image_ssim(predictions, references, convention="paper"),
                               reference_paper_ssim(predictions, references), rtol=1e-10, atol=1e-10)
    if channels == 1:  # no colour conversion: the paper's PSNR of grayscale images is the plain one
        torch.testing.assert_close(per_image_psnr(predictions, references, convention="paper"),
                                   per_image_psnr(predictions, references))
    else:
        assert not torch.allclose(per_image_psnr(predictions, references, convention="paper"),
                                  per_image_psnr(predictions, references))


def test_evaluate_modules_take_the_convention():
    predictions, references = _pair(seed=3)
    to_model = lambda t: t * 2 - 1  # noqa: E731  (the modules read [-1, 1] by default)
    psnr = metrics.load("psnr", convention="paper").compute(predictions=to_model(predictions),
                                                          references=to_model(references))
    ssim = metrics.load("ssim", convention="paper").compute(predictions=to_model(predictions),
                                                          references=to_model(references))
    assert psnr["psnr"] == pytest.approx(float(reference_paper_psnr(predictions, references).mean()), abs=1e-9)
    assert ssim["ssim"] == pytest.approx(float(reference_paper_ssim(predictions, references).mean()), abs=1e-9)
    plain = metrics.load("psnr").compute(predictions=to_model(predictions), references=to_model(references))
    assert plain["psnr"] != pytest.approx(psnr["psnr"], abs=0.05)
    with pytest.raises(ValueError, match="convention"):
        metrics.load("psnr", convention="ycbcr")
    with pytest.raises(ValueError, match="convention"):
        network = metrics.LPIPSNetwork(stages=[[4], [6, 6]], in_channels=3)
        metrics.load("lpips", network=network, convention="paper")  # LPIPS has one convention
