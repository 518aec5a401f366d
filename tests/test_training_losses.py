"""optvq_hf.training.losses against references written here: the taming PatchGAN layout and initialization, the
vanilla discriminator loss and the adaptive weight by hand, the defaults of OptVQLoss, the frozen LPIPS, float32
computation (each written against a mutant that survived tests/test_training.py; see docs/testing.md)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn

from optvq_hf.training import LPIPS, NLayerDiscriminator, OptVQLoss, adaptive_gan_weight
from optvq_hf.training.losses import vanilla_discriminator_loss

torch.set_num_threads(1)


def taming_patchgan(in_channels: int, width: int, num_layers: int) -> nn.Sequential:
    """The PatchGAN of taming-transformers / pix2pix, from its description: a 4x4 stride-2 convolution with bias and
    LeakyReLU(0.2); `num_layers` 4x4 convolutions without bias, each followed by BatchNorm and LeakyReLU(0.2), whose
    width doubles up to 8x (stride 2, the last one stride 1); a 4x4 stride-1 convolution to one logit. Padding 1."""
    layers = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
    factors = [1] + [min(2**n, 8) for n in range(1, num_layers + 1)]
    for n in range(1, num_layers + 1):
        stride = 1 if n == num_layers else 2
        layers += [nn.Conv2d(width * factors[n - 1], width * factors[n], 4, stride, 1, bias=False),
                   nn.BatchNorm2d(width * factors[n]), nn.LeakyReLU(0.2)]
    layers.append(nn.Conv2d(width * factors[-1], 1, 4, 1, 1))
    return nn.Sequential(*layers)


def _same_network(discriminator: nn.Module, reference: nn.Sequential, in_channels: int, size: int):
    """Same parameter names and shapes (strict load) and the same logits in train and eval mode."""
    reference.load_state_dict(discriminator.main.state_dict(), strict=True)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, in_channels, size, size, generator=generator) * 2 - 1
    for training in (True, False):
        discriminator.train(training)
        reference.train(training)
        with torch.no_grad():
            logits = discriminator(images)
            torch.testing.assert_close(logits, reference(images), rtol=1e-5, atol=1e-6)
    return logits


@pytest.mark.parametrize("arguments", [(1, 8, 1), (1, 8, 2), (2, 4, 4)])
def test_the_patchgan_is_the_taming_layout(arguments):
    in_channels, width, num_layers = arguments
    torch.manual_seed(0)
    discriminator = NLayerDiscriminator(in_channels, width, num_layers)
    logits = _same_network(discriminator, taming_patchgan(*arguments), in_channels, 64)
    # 64 -> 32 by the first layer, halved by every strided one, then two stride-1 4x4 convolutions (each -1)
    side = 32 // 2 ** (num_layers - 1) - 2
    assert logits.shape == (2, 1, side, side)
    with pytest.raises(ValueError, match="num_layers"):
        NLayerDiscriminator(in_channels, width, 0)


def test_the_default_patchgan_and_optvq_loss_discriminator_are_tamings_3_layers_of_width_64():
    torch.manual_seed(0)
    for discriminator in (NLayerDiscriminator(), OptVQLoss(gan_weight=0.5).discriminator):
        logits = _same_network(discriminator, taming_patchgan(3, 64, 3), 3, 32)
        assert logits.shape == (2, 1, 2, 2)


def test_the_patchgan_starts_from_the_taming_initialization():
    """Convolutions ~ N(0, 0.02) with zero biases, BatchNorm scales ~ N(1, 0.02) and zero shifts (Kolmogorov-Smirnov
    against scipy), also after the parameters were overwritten and `reset_parameters` ran again."""
    torch.manual_seed(0)
    discriminator = NLayerDiscriminator()
    for rerun in (False, True):
        if rerun:
            with torch.no_grad():
                for parameter in discriminator.parameters():
                    parameter.fill_(3.0)
            discriminator.reset_parameters()
        convolutions = [m for m in discriminator.modules() if isinstance(m, nn.Conv2d)]
        norms = [m for m in discriminator.modules() if isinstance(m, nn.BatchNorm2d)]
        weights = torch.cat([m.weight.detach().flatten() for m in convolutions]).double().numpy()
        scales = torch.cat([m.weight.detach() for m in norms]).double().numpy()
        assert stats.kstest(weights, stats.norm(0.0, 0.02).cdf).pvalue > 1e-3
        assert stats.kstest(scales, stats.norm(1.0, 0.02).cdf).pvalue > 1e-3
        assert [m.bias is None for m in convolutions] == [False, True, True, True, False]
        for module in [convolutions[0], convolutions[-1]] + norms:
            assert not module.bias.any()


def test_the_vanilla_discriminator_loss_by_hand():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0, 3.0])

    def softplus(x):
        return math.log1p(math.exp(x))

    expected = 0.5 * (sum(softplus(-r) for r in real.tolist()) / 3 + sum(softplus(f) for f in fake.tolist()) / 4)
    assert vanilla_discriminator_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    loss = OptVQLoss(gan_weight=1.0, disc_loss="vanilla", disc_in_channels=1, disc_num_layers=1, disc_base_channels=4)
    assert loss.disc_loss_fn is vanilla_discriminator_loss


def test_optvq_loss_defaults_hinge_from_step_0():
    """`disc_loss="hinge"` and `disc_start=0` by default: the discriminator's loss at step 0 is the hinge loss of its
    logits, computed here by hand."""
    torch.manual_seed(0)
    loss = OptVQLoss(gan_weight=0.5)
    assert loss.gan_active(0)
    images, reconstructions = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    output = loss.discriminator_loss(images, reconstructions)
    with torch.no_grad():
        real, fake = loss.discriminator(images).double(), loss.discriminator(reconstructions).double()
    expected = 0.5 * ((1 - real).clamp_min(0).mean() + (1 + fake).clamp_min(0).mean())
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert output.discriminator.item() == pytest.approx(expected.item(), rel=1e-5)


def _linear_case(rec_scale: float, gan_scale: float):
    """A last layer `w` (1 x 2) and two losses whose gradients with respect to it are known: the reconstruction
    loss's has norm 110 * rec_scale, the generator loss's 5 * gan_scale."""
    weight = torch.tensor([[1.0, 2.0]], requires_grad=True)
    out = torch.tensor([[3.0, 4.0]]) @ weight.T  # 11
    return weight, rec_scale * (out**2).sum(), -gan_scale * out.sum()


def test_the_adaptive_weight_by_hand_below_one_above_the_cap_and_the_graph_kept():
    weight, rec, gan = _linear_case(1 / 22, 22.0)  # norms 5 and 110: a weight below 1
    assert adaptive_gan_weight(rec, gan, weight).item() == pytest.approx(5 / (110 + 1e-4), rel=1e-6)
    weight, rec, gan = _linear_case(1.0, 0.0)  # no generator gradient: 110 / 1e-4, capped
    assert adaptive_gan_weight(rec, gan, weight).item() == 1e4
    assert adaptive_gan_weight(rec, gan, weight, max_weight=50.0).item() == 50.0
    weight, rec, gan = _linear_case(float("nan"), 1.0)  # a NaN reconstruction gradient: weight 0, not NaN
    assert adaptive_gan_weight(rec, gan, weight).item() == 0.0
    # the training step back-propagates through both losses afterwards: the graph is still there
    weight, rec, gan = _linear_case(1.0, 1.0)
    factor = adaptive_gan_weight(rec, gan, weight)
    assert not factor.requires_grad
    (rec + factor * gan).backward()
    expected = torch.tensor([[66.0, 88.0]]) - factor * torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(weight.grad, expected)


def test_log_terms_at_the_default_step_are_those_of_step_0():
    torch.manual_seed(0)
    loss = OptVQLoss(gan_weight=0.5, disc_start=1, disc_in_channels=1, disc_num_layers=1, disc_base_channels=4)
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    reconstructions = (images + 0.1).requires_grad_()
    output = loss.generator_loss(images, reconstructions, torch.tensor(0.25))
    terms = loss.log_terms(output)
    assert set(terms) == {"loss", "l1", "l2", "quantization"}
    assert terms["loss"].grad_fn is None and output.loss.grad_fn is not None


def test_lpips_stays_frozen_and_in_eval_mode():
    """A bare LPIPS (as the tests pass to OptVQLoss) is frozen as a loaded one: `.train()` keeps it in eval mode
    and a backward through the perceptual term leaves its parameters without gradient."""
    torch.manual_seed(0)
    lpips = LPIPS()
    assert not any(p.requires_grad for p in lpips.parameters()) and not any(m.training for m in lpips.modules())
    lpips.train()
    assert not any(m.training for m in lpips.modules())
    loss = OptVQLoss(l1_weight=0, l2_weight=0, perceptual_weight=1.0, perceptual_model=lpips)
    loss.train()
    assert not any(m.training for m in lpips.modules())
    reconstructions = (torch.rand(1, 3, 16, 16) * 2 - 1).requires_grad_()
    loss.generator_loss(torch.rand(1, 3, 16, 16) * 2 - 1, reconstructions, torch.tensor(0.0)).loss.backward()
    assert reconstructions.grad is not None and all(p.grad is None for p in lpips.parameters())


def test_bfloat16_images_give_the_float32_loss():
    """Everything is computed in float32: bf16 images and reconstructions give the loss of their float32 values
    (with a perceptual term, whose network is float32)."""
    torch.manual_seed(0)
    loss = OptVQLoss(perceptual_weight=1.0, perceptual_model=LPIPS(), quantization_weight=2.0)
    images = (torch.rand(2, 3, 16, 16) * 2 - 1).bfloat16()
    reconstructions = (torch.rand(2, 3, 16, 16) * 2 - 1).bfloat16()
    quantization = torch.tensor(0.3, dtype=torch.bfloat16)
    low = loss.generator_loss(images, reconstructions, quantization)
    high = loss.generator_loss(images.float(), reconstructions.float(), quantization.float())
    for name in ("loss", "l1", "l2", "perceptual", "quantization"):
        assert low[name].dtype == torch.float32 and torch.equal(low[name], high[name]), name


def test_optvq_loss_defaults_by_hand():
    """Defaults: L1 and L2 weights 1, LPIPS and GAN off, quantization weight 1."""
    torch.manual_seed(0)
    images, reconstructions = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    loss = OptVQLoss()
    assert loss.perceptual is None and loss.discriminator is None
    output = loss.generator_loss(images, reconstructions, torch.tensor(0.75))
    difference = (reconstructions - images).double()
    expected = difference.abs().mean() + difference.square().mean() + 0.75
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert output.generator.item() == 0.0 and output.generator_weight.item() == 0.0
    with pytest.raises(ValueError, match="no discriminator"):
        loss.discriminator_loss(images, reconstructions)


def test_a_zero_weight_term_is_neither_computed_nor_reported():
    torch.manual_seed(0)
    images, reconstructions = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    for weights, zero in (((0.0, 1.0), "l1"), ((1.0, 0.0), "l2")):
        output = OptVQLoss(l1_weight=weights[0], l2_weight=weights[1]).generator_loss(images, reconstructions,
                                                                                       torch.tensor(0.0))
        assert output[zero].item() == 0.0
        difference = (reconstructions - images).double()
        kept = difference.abs().mean() if zero == "l2" else difference.square().mean()
        assert output.loss.item() == pytest.approx(kept.item(), rel=1e-6)


def _gan_setup(disc_start=0):
    """A last layer (a 3x3 convolution) that makes the reconstructions, and a small GAN loss."""
    torch.manual_seed(0)
    last = nn.Conv2d(4, 1, 3, padding=1)
    features = torch.randn(2, 4, 16, 16)
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    loss = OptVQLoss(gan_weight=0.5, disc_start=disc_start, disc_in_channels=1, disc_num_layers=1,
                     disc_base_channels=4, perceptual_weight=1.0, perceptual_model=LPIPS())
    return last, features, images, loss


def test_the_generator_terms_by_hand_and_every_part_detached():
    """-mean D(x_rec), the adaptive weight times gan_weight (gradients of this step's reconstruction and generator
    losses with respect to the last layer, taken here), the total; the output's parts carry no graph."""
    last, features, images, loss = _gan_setup()
    reconstructions = last(features)
    quantization = (last.weight ** 2).sum()  # a quantizer loss with a graph
    output = loss.generator_loss(images, reconstructions, quantization, last_layer_weight=last.weight)
    difference = reconstructions - images
    reconstruction = (difference.abs().mean() + difference.square().mean()
                      + loss.perceptual(images, reconstructions).mean())
    generator = -loss.discriminator(reconstructions).mean()
    rec_grad = torch.autograd.grad(reconstruction, last.weight, retain_graph=True)[0]
    gen_grad = torch.autograd.grad(generator, last.weight, retain_graph=True)[0]
    weight = 0.5 * rec_grad.norm() / (gen_grad.norm() + 1e-4)
    torch.testing.assert_close(output.generator, generator.detach())
    torch.testing.assert_close(output.generator_weight, weight, rtol=1e-5, atol=0)
    torch.testing.assert_close(output.loss, reconstruction + quantization + weight * generator, rtol=1e-5, atol=0)
    assert output.loss.grad_fn is not None
    for name in ("l1", "l2", "perceptual", "reconstruction", "quantization", "generator", "generator_weight"):
        assert output[name].grad_fn is None, name


def test_the_discriminator_loss_is_detached_from_the_autoencoder_and_off_before_its_start():
    last, features, images, loss = _gan_setup(disc_start=1)
    images.requires_grad_()
    reconstructions = last(features)
    before = loss.discriminator_loss(images, reconstructions)  # default step 0 < disc_start
    assert before.loss.item() == 0.0 and before.discriminator.item() > 0.0
    after = loss.discriminator_loss(images, reconstructions, global_step=1)
    with torch.no_grad():
        real, fake = loss.discriminator(images).double(), loss.discriminator(reconstructions).double()
    hinge = 0.5 * ((1 - real).clamp_min(0).mean() + (1 + fake).clamp_min(0).mean())
    assert after.loss.item() == pytest.approx(hinge.item(), rel=1e-5) and after.discriminator.grad_fn is None
    after.loss.backward()
    assert images.grad is None and last.weight.grad is None
    assert all(p.grad is not None for p in loss.discriminator.parameters())


def test_the_gan_terms_are_float32_under_autocast_and_for_bfloat16_images():
    """Under bf16 autocast the discriminator's logits are bf16: the losses are taken on them in float32. bf16
    images give the losses of their float32 values."""
    last, features, images, loss = _gan_setup()
    with torch.no_grad():
        reconstructions = last(features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = loss.discriminator_loss(images, reconstructions)
        generator = loss.generator_loss(images, reconstructions, torch.tensor(0.0),
                                        last_layer_weight=last.weight).generator
        real, fake = loss.discriminator(images), loss.discriminator(reconstructions)
    assert real.dtype == torch.bfloat16 and output.discriminator.dtype == torch.float32
    real, fake = real.float(), fake.float()
    expected = 0.5 * (torch.relu(1.0 - real).mean() + torch.relu(1.0 + fake).mean())
    torch.testing.assert_close(output.discriminator, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(generator, -fake.mean(), rtol=1e-6, atol=0)
    low = loss.discriminator_loss(images.bfloat16(), reconstructions.bfloat16())
    high = loss.discriminator_loss(images.bfloat16().float(), reconstructions.bfloat16().float())
    assert torch.equal(low.loss, high.loss)


def test_float64_images_and_the_discriminator_weight():
    """float64 images are computed in float32 as well (the float32 loss of their values); the discriminator's loss is
    disc_weight times the hinge loss."""
    torch.manual_seed(0)
    images, reconstructions = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    loss = OptVQLoss()
    for low, high in ((images.double(), images), (images, images.double())):
        output = loss.generator_loss(low, reconstructions.to(high.dtype), torch.tensor(0.5))
        expected = loss.generator_loss(images, reconstructions, torch.tensor(0.5))
        for name in ("loss", "l1", "l2"):
            assert output[name].dtype == torch.float32 and torch.equal(output[name], expected[name]), name
    weighted = OptVQLoss(gan_weight=0.5, disc_weight=2.0, disc_in_channels=3, disc_num_layers=1, disc_base_channels=4)
    output = weighted.discriminator_loss(images, reconstructions)
    assert output.loss.item() == pytest.approx(2.0 * output.discriminator.item(), rel=1e-6)
