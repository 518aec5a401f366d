"""Training losses of OptVQ: L1/L2 reconstruction, LPIPS perceptual loss, hinge PatchGAN with the VQGAN adaptive
weight, and the quantizer's own loss, combined as in the original recipe.

The LPIPS network is the project's one [`~optvq_hf.metrics.LPIPSNetwork`] (VGG16 trunk + learned 1x1 "lin" heads,
plain PyTorch, no torchvision, no `lpips` package), frozen; its weights are read from a safetensors file, a local
folder or a Hub repository; key names are those of torchvision's `vgg16().features` (`features.{i}.weight`) and of
the `lpips` package's heads (`lin{k}.model.1.weight`), so existing weights convert by a plain `save_file`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from ..metrics.networks import LPIPS_WEIGHTS_NAME, LPIPSNetwork

__all__ = [
    "LPIPS",
    "NLayerDiscriminator",
    "OptVQLoss",
    "OptVQLossOutput",
    "hinge_discriminator_loss",
    "vanilla_discriminator_loss",
    "adaptive_gan_weight",
    "LPIPS_WEIGHTS_NAME",
]


class LPIPS(LPIPSNetwork):
    """LPIPS perceptual distance with a VGG16 trunk (Zhang et al., 2018), frozen, always in eval mode: the training
    loss's [`~optvq_hf.metrics.LPIPSNetwork`].

    Inputs are images in [-1, 1], `(B, 1 or 3, H, W)` (grayscale is repeated to RGB); the output is the per-image
    distance `(B,)`. Build it with [`LPIPS.from_pretrained`]; a bare `LPIPS()` has random weights (tests only).
    """

    def __init__(self, **network_kwargs):
        super().__init__(**network_kwargs)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        # Always frozen and deterministic.
        return super().train(False)

    @classmethod
    def from_pretrained(cls, name_or_path: str, filename: str | None = LPIPS_WEIGHTS_NAME, **hub_kwargs) -> "LPIPS":
        """Load LPIPS-VGG weights from a `.safetensors` file, a folder holding `filename`, or a Hub repository.

        Args:
            name_or_path (`str`): a file path, a local folder, or a Hub repository id.
            filename (`str`, defaults to `"lpips_vgg.safetensors"`): file to read inside a folder or repository
                (`"model.safetensors"`, or `None`, reads an `LPIPSNetwork.save_pretrained` folder).
            hub_kwargs: passed to `huggingface_hub.hf_hub_download` (`revision`, `token`, `cache_dir`, ...).
        """
        return super().from_pretrained(name_or_path, filename=filename, **hub_kwargs)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming): strided 4x4 convs, BatchNorm, LeakyReLU(0.2); one logit per patch.

    Args:
        in_channels (`int`, defaults to 3): channels of the images.
        base_channels (`int`, defaults to 64): width of the first layer (`ndf`).
        num_layers (`int`, defaults to 3): strided layers after the first.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"`num_layers` must be >= 1, got {num_layers}.")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        width = base_channels
        for index in range(1, num_layers + 1):
            new_width = base_channels * min(2**index, 8)
            stride = 2 if index < num_layers else 1
            layers += [
                nn.Conv2d(width, new_width, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(new_width),
                nn.LeakyReLU(0.2),
            ]
            width = new_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Convolutions ~ N(0, 0.02); BatchNorm scale ~ N(1, 0.02), shift 0 (the taming initialization)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch logits `(B, 1, h, w)` for images `(B, C, H, W)`."""
        return self.main(pixel_values)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """`0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))`."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """`0.5 * (mean(softplus(-real)) + mean(softplus(fake)))`."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adaptive_gan_weight(reconstruction_loss: torch.Tensor, generator_loss: torch.Tensor,
                        last_layer_weight: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """The VQGAN adaptive weight `||d rec / d w|| / (||d gan / d w|| + 1e-4)`, clamped to `[0, max_weight]`, detached.

    `w` is the weight of the decoder's last layer. Returns 0 when the gradients cannot be taken (e.g. in eval) or
    are not finite.
    """
    try:
        rec_grad = torch.autograd.grad(reconstruction_loss, last_layer_weight, retain_graph=True)[0]
        gan_grad = torch.autograd.grad(generator_loss, last_layer_weight, retain_graph=True)[0]
    except RuntimeError:
        return torch.zeros((), device=reconstruction_loss.device)
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    weight = torch.clamp(weight, 0.0, max_weight).detach()
    return torch.nan_to_num(weight, nan=0.0, posinf=max_weight)


@dataclass
class OptVQLossOutput(ModelOutput):
    """Loss of one training step and its parts (all scalars, float32).

    Args:
        loss (`torch.FloatTensor`): the total to back-propagate.
        l1 (`torch.FloatTensor`): mean absolute pixel error.
        l2 (`torch.FloatTensor`): mean squared pixel error.
        perceptual (`torch.FloatTensor`): mean LPIPS (0 when its weight is 0).
        reconstruction (`torch.FloatTensor`): `l1_weight * l1 + l2_weight * l2 + perceptual_weight * perceptual`.
        quantization (`torch.FloatTensor`): the quantizer's loss.
        generator (`torch.FloatTensor`): `-mean(D(reconstruction))` (0 before `disc_start`).
        generator_weight (`torch.FloatTensor`): the adaptive weight times `gan_weight` (0 before `disc_start`).
        discriminator (`torch.FloatTensor`): the discriminator's loss (only from `discriminator_loss`).
    """

    loss: torch.FloatTensor | None = None
    l1: torch.FloatTensor | None = None
    l2: torch.FloatTensor | None = None
    perceptual: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    quantization: torch.FloatTensor | None = None
    generator: torch.FloatTensor | None = None
    generator_weight: torch.FloatTensor | None = None
    discriminator: torch.FloatTensor | None = None


class OptVQLoss(nn.Module):
    """The original OptVQ training objective.

    `loss = l1_weight * L1 + l2_weight * L2 + perceptual_weight * LPIPS + quantization_weight * L_q
    + [step >= disc_start] * adaptive_weight * gan_weight * (-mean D(x_rec))`, and, for the discriminator,
    `disc_weight * hinge(D(x), D(x_rec))` from `disc_start` on. Everything is computed in float32.

    Args:
        l1_weight (`float`, defaults to 1.0): weight of the L1 pixel loss.
        l2_weight (`float`, defaults to 1.0): weight of the L2 pixel loss.
        perceptual_weight (`float`, defaults to 0.0): weight of LPIPS; when 0 no network is built or loaded.
        perceptual_model (`str` or [`LPIPS`], *optional*): LPIPS weights (file, folder or Hub id) or a module;
            required when `perceptual_weight > 0`.
        quantization_weight (`float`, defaults to 1.0): weight of the quantizer's loss.
        gan_weight (`float`, defaults to 0.0): weight of the generator loss (times the adaptive weight); 0 builds
            no discriminator.
        disc_weight (`float`, defaults to 1.0): weight of the discriminator loss.
        disc_start (`int`, defaults to 0): first optimizer step at which the GAN terms are on.
        disc_in_channels (`int`, defaults to 3): channels of the images the discriminator sees.
        disc_num_layers (`int`, defaults to 3): PatchGAN depth.
        disc_base_channels (`int`, defaults to 64): PatchGAN width.
        disc_loss (`str`, defaults to `"hinge"`): `"hinge"` or `"vanilla"`.
    """

    def __init__(
        self,
        l1_weight: float = 1.0,
        l2_weight: float = 1.0,
        perceptual_weight: float = 0.0,
        perceptual_model: str | LPIPS | None = None,
        quantization_weight: float = 1.0,
        gan_weight: float = 0.0,
        disc_weight: float = 1.0,
        disc_start: int = 0,
        disc_in_channels: int = 3,
        disc_num_layers: int = 3,
        disc_base_channels: int = 64,
        disc_loss: str = "hinge",
    ):
        super().__init__()
        for name, value in (("l1_weight", l1_weight), ("l2_weight", l2_weight),
                            ("perceptual_weight", perceptual_weight), ("quantization_weight", quantization_weight),
                            ("gan_weight", gan_weight), ("disc_weight", disc_weight)):
            if value < 0:
                raise ValueError(f"`{name}` must be >= 0, got {value}.")
        if disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"`disc_loss` must be 'hinge' or 'vanilla', got {disc_loss!r}.")
        self.l1_weight = float(l1_weight)
        self.l2_weight = float(l2_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.quantization_weight = float(quantization_weight)
        self.gan_weight = float(gan_weight)
        self.disc_weight = float(disc_weight)
        self.disc_start = int(disc_start)
        self.disc_loss_fn = hinge_discriminator_loss if disc_loss == "hinge" else vanilla_discriminator_loss
        self.perceptual = None
        if self.perceptual_weight > 0:
            if perceptual_model is None:
                raise ValueError(
                    "`perceptual_weight` > 0 needs LPIPS weights: pass `perceptual_model` (a .safetensors file, a "
                    f"folder with {LPIPS_WEIGHTS_NAME!r}, or a Hub repository id), or set the weight to 0."
                )
            self.perceptual = perceptual_model if isinstance(perceptual_model, LPIPS) else LPIPS.from_pretrained(
                perceptual_model
            )
        self.discriminator = (
            NLayerDiscriminator(disc_in_channels, disc_base_channels, disc_num_layers) if self.gan_weight > 0 else None
        )

    @property
    def uses_gan(self) -> bool:
        """Whether a discriminator is trained."""
        return self.discriminator is not None

    def gan_active(self, global_step: int) -> bool:
        """Whether the GAN terms are on at this optimizer step."""
        return self.uses_gan and global_step >= self.disc_start

    def log_terms(self, output: OptVQLossOutput, global_step: int = 0) -> dict[str, torch.Tensor]:
        """The parts of a loss output worth logging, by name: for [`generator_loss`]'s, the total (`loss`), every
        term whose weight is non-zero and, once the GAN is on, `generator` and `generator_weight`; for
        [`discriminator_loss`]'s, `discriminator`. Training loops log this dict as it comes."""
        if output.discriminator is not None:
            return {"discriminator": output.discriminator}
        weights = {"l1": self.l1_weight, "l2": self.l2_weight, "perceptual": self.perceptual_weight,
                   "quantization": self.quantization_weight}
        terms = {"loss": output.loss.detach()}
        terms.update({name: output[name] for name, weight in weights.items() if weight > 0})
        if self.gan_active(global_step):
            terms.update(generator=output.generator, generator_weight=output.generator_weight)
        return terms

    def generator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, quantization_loss: torch.Tensor,
                       global_step: int = 0, last_layer_weight: torch.Tensor | None = None,
                       discriminator: nn.Module | None = None) -> OptVQLossOutput:
        """Loss of the autoencoder for one batch.

        Args:
            inputs (`torch.Tensor`): original images in [-1, 1].
            reconstructions (`torch.Tensor`): the model's reconstructions.
            quantization_loss (`torch.Tensor`): the quantizer's loss.
            global_step (`int`): current optimizer step (switches the GAN terms on at `disc_start`).
            last_layer_weight (`torch.Tensor`, *optional*): weight of the decoder's last layer, for the adaptive
                weight; required once the GAN is active.
            discriminator (`nn.Module`, *optional*): the discriminator to call (defaults to `self.discriminator`; the
                training script passes the bare module, not its DDP wrapper, as it is frozen in this pass).
        """
        inputs = inputs.float()
        reconstructions = reconstructions.float()
        zero = torch.zeros((), device=inputs.device)
        diff = reconstructions - inputs
        l1 = diff.abs().mean() if self.l1_weight > 0 else zero
        l2 = diff.pow(2).mean() if self.l2_weight > 0 else zero
        perceptual = self.perceptual(inputs, reconstructions).mean() if self.perceptual is not None else zero
        reconstruction = self.l1_weight * l1 + self.l2_weight * l2 + self.perceptual_weight * perceptual
        quantization = quantization_loss.float().mean()
        loss = reconstruction + self.quantization_weight * quantization
        generator, generator_weight = zero, zero
        if self.gan_active(global_step):
            if last_layer_weight is None:
                raise ValueError("`last_layer_weight` is required once the GAN loss is active (adaptive weight).")
            discriminator = discriminator if discriminator is not None else self.discriminator
            generator = -discriminator(reconstructions).float().mean()
            generator_weight = adaptive_gan_weight(reconstruction, generator, last_layer_weight) * self.gan_weight
            loss = loss + generator_weight * generator
        return OptVQLossOutput(loss=loss, l1=l1.detach(), l2=l2.detach(), perceptual=perceptual.detach(),
                               reconstruction=reconstruction.detach(), quantization=quantization.detach(),
                               generator=generator.detach(), generator_weight=generator_weight.detach())

    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int = 0,
                           discriminator: nn.Module | None = None) -> OptVQLossOutput:
        """Loss of the discriminator (`disc_weight` times hinge or vanilla), zero before `disc_start`.

        Args:
            inputs (`torch.Tensor`): original images in [-1, 1].
            reconstructions (`torch.Tensor`): reconstructions (detached here).
            global_step (`int`): current optimizer step.
            discriminator (`nn.Module`, *optional*): the module to call (e.g. its DDP wrapper).
        """
        if not self.uses_gan:
            raise ValueError("This loss has no discriminator (`gan_weight` is 0).")
        discriminator = discriminator if discriminator is not None else self.discriminator
        logits_real = discriminator(inputs.detach().float())
        logits_fake = discriminator(reconstructions.detach().float())
        factor = 1.0 if self.gan_active(global_step) else 0.0
        loss_d = self.disc_loss_fn(logits_real.float(), logits_fake.float())
        return OptVQLossOutput(loss=loss_d * self.disc_weight * factor, discriminator=loss_d.detach())
