"""Encoder/decoder networks of OptVQ: the VQGAN (taming-transformers) backbone and the paper's Table 4 CNN.

Module names follow the original release so that its checkpoints load by renaming a prefix only
(`encoder.down.{level}.block.{i}.conv1`, `decoder.up.{level}.upsample.conv`, ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


def _group_norm(channels: int, config) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=config.norm_num_groups, num_channels=channels, eps=config.norm_eps, affine=True)


class OptVQResnetBlock(GradientCheckpointingLayer):
    """GroupNorm-swish-conv x2 with a residual; a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, config, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels, config)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, config)
        self.dropout = nn.Dropout(config.dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states if self.nin_shortcut is None else self.nin_shortcut(hidden_states)
        hidden_states = self.conv1(F.silu(self.norm1(hidden_states)))
        hidden_states = self.conv2(self.dropout(F.silu(self.norm2(hidden_states))))
        return residual + hidden_states


class OptVQAttnBlock(GradientCheckpointingLayer):
    """Single-head self-attention over all positions (1x1-conv q/k/v/proj_out), scale `C ** -0.5`."""

    def __init__(self, config, channels: int):
        super().__init__()
        self.config = config
        self.norm = _group_norm(channels, config)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = hidden_states.shape
        normed = self.norm(hidden_states)
        # (B, 1 head, H*W, C)
        query, key, value = (
            proj(normed).reshape(batch, 1, channels, height * width).transpose(-1, -2)
            for proj in (self.q, self.k, self.v)
        )
        if getattr(self.config, "_attn_implementation", "sdpa") == "eager":
            weights = torch.softmax((query @ key.transpose(-1, -2)) * channels**-0.5, dim=-1)
            attended = weights @ value
        else:
            attended = F.scaled_dot_product_attention(query, key, value)
        attended = attended.transpose(-1, -2).reshape(batch, channels, height, width)
        return hidden_states + self.proj_out(attended)


class OptVQDownsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(hidden_states, (0, 1, 0, 1)))


class OptVQUpsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(hidden_states, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: residual blocks, attention after each where the resolution asks, a resampler."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def run_blocks(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.block):
            hidden_states = block(hidden_states)
            if len(self.attn):
                hidden_states = self.attn[index](hidden_states)
        return hidden_states


class _Middle(nn.Module):
    def __init__(self, config, channels: int):
        super().__init__()
        self.block_1 = OptVQResnetBlock(config, channels, channels)
        self.attn_1 = OptVQAttnBlock(config, channels)
        self.block_2 = OptVQResnetBlock(config, channels, channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(hidden_states)))


class VQGANEncoder(nn.Module):
    """Taming-transformers VQGAN encoder: `(B, in_channels, H, W)` -> `(B, latent_channels, H/f, W/f)`."""

    def __init__(self, config):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_multipliers]
        self.conv_in = nn.Conv2d(config.in_channels, config.base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        current_resolution = config.resolution
        in_width = config.base_channels
        for level, width in enumerate(widths):
            stage = _Level()
            for _ in range(config.num_res_blocks):
                stage.block.append(OptVQResnetBlock(config, in_width, width))
                in_width = width
                if current_resolution in config.attn_resolutions:
                    stage.attn.append(OptVQAttnBlock(config, width))
            if level != len(widths) - 1:
                stage.downsample = OptVQDownsample(width)
                current_resolution //= 2
            self.down.append(stage)
        self.mid = _Middle(config, in_width)
        self.norm_out = _group_norm(in_width, config)
        self.conv_out = nn.Conv2d(in_width, config.latent_channels, 3, padding=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv_in(pixel_values)
        for stage in self.down:
            hidden_states = stage.run_blocks(hidden_states)
            if hasattr(stage, "downsample"):
                hidden_states = stage.downsample(hidden_states)
        hidden_states = self.mid(hidden_states)
        return self.conv_out(F.silu(self.norm_out(hidden_states)))


class VQGANDecoder(nn.Module):
    """Taming-transformers VQGAN decoder: `(B, latent_channels, h, w)` -> `(B, out_channels, h*f, w*f)`.

    `up` is indexed by level (`up.0` is the full-resolution level, run last), as in the original checkpoints.
    """

    def __init__(self, config):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_multipliers]
        num_levels = len(widths)
        in_width = widths[-1]
        current_resolution = config.resolution // 2 ** (num_levels - 1)
        self.conv_in = nn.Conv2d(config.latent_channels, in_width, 3, padding=1)
        self.mid = _Middle(config, in_width)
        stages = [None] * num_levels
        for level in reversed(range(num_levels)):
            stage = _Level()
            for _ in range(config.num_res_blocks + 1):
                stage.block.append(OptVQResnetBlock(config, in_width, widths[level]))
                in_width = widths[level]
                if current_resolution in config.attn_resolutions:
                    stage.attn.append(OptVQAttnBlock(config, in_width))
            if level != 0:
                stage.upsample = OptVQUpsample(in_width)
                current_resolution *= 2
            stages[level] = stage
        self.up = nn.ModuleList(stages)
        self.norm_out = _group_norm(in_width, config)
        self.conv_out = nn.Conv2d(in_width, config.out_channels, 3, padding=1)

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """Weight of the last convolution (the VQGAN adaptive GAN weight is computed on it)."""
        return self.conv_out.weight

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        hidden_states = self.mid(self.conv_in(latents))
        for stage in reversed(self.up):
            hidden_states = stage.run_blocks(hidden_states)
            if hasattr(stage, "upsample"):
                hidden_states = stage.upsample(hidden_states)
        return self.conv_out(F.silu(self.norm_out(hidden_states)))


class _SignalPreservingInit:
    """Initialization of the small CNN's convolutions that keeps the signal's scale from layer to layer.

    PyTorch's default (`kaiming_uniform_(a=sqrt(5))`, weight variance `1 / (3 fan_in)`, bias up to `1 / sqrt(fan_in)`)
    shrinks the variation across images by about 2.4x per layer in this normalization-free ReLU network: the untrained
    encoder's output then varies across images by ~0.002 around per-channel constants of ~0.1 (its biases), and the
    untrained autoencoder's reconstructions vary across images by ~1e-5 of the images' own spread, i.e. it starts as a
    constant function. Training must first escape that state, and at the demo's learning rate the decoder's ReLUs died
    during the escape for 3 of 10 seeds (docs/benchmarks.md, "The demo across seeds"). Here weights are
    `N(0, gain^2 / fan_in)` with `gain = sqrt(2)` when the input comes out of a ReLU (He) and 1 otherwise, and biases
    start at zero, so each layer keeps the second moment of its input and the untrained autoencoder already
    reconstructs with a spread across images of ~0.5-0.75. Checkpoints are unaffected (same parameters and names).
    """

    relu_input: bool = False

    def reset_parameters(self):
        fan_in = self.in_channels * math.prod(self.kernel_size) // self.groups
        if isinstance(self, nn.ConvTranspose2d):
            fan_in //= math.prod(self.stride)  # an output pixel sees kernel / stride taps of each input channel
        nn.init.normal_(self.weight, 0.0, math.sqrt((2.0 if self.relu_input else 1.0) / fan_in))
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class _Conv2d(_SignalPreservingInit, nn.Conv2d):
    """A convolution whose input is not a ReLU output (gain 1)."""


class _ConvAfterReLU(_SignalPreservingInit, nn.Conv2d):
    """A convolution applied to a ReLU output (gain sqrt(2))."""

    relu_input = True


class _ConvTransposeAfterReLU(_SignalPreservingInit, nn.ConvTranspose2d):
    """A transposed convolution applied to a ReLU output (gain sqrt(2))."""

    relu_input = True


class SimpleCNNEncoder(GradientCheckpointingLayer):
    """The paper's Table 4 encoder (f = 4): conv3x3-ReLU, [conv2x2/2, conv3x3-ReLU] x 2, conv3x3.

    Small enough to be checkpointed as a whole under gradient checkpointing.

    Widths are `base_channels * channel_multipliers` (16, 16, 32 in the paper); output has `latent_channels`.
    """

    def __init__(self, config):
        super().__init__()
        first, second, third = (config.base_channels * m for m in config.channel_multipliers)
        self.in_fc = _Conv2d(config.in_channels, first, 3, padding=1)
        self.down1 = _ConvAfterReLU(first, first, 2, stride=2)
        self.conv1 = _Conv2d(first, second, 3, padding=1)
        self.down2 = _ConvAfterReLU(second, second, 2, stride=2)
        self.conv2 = _Conv2d(second, third, 3, padding=1)
        self.out_fc = _ConvAfterReLU(third, config.latent_channels, 3, padding=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = F.relu(self.in_fc(pixel_values))
        hidden_states = F.relu(self.conv1(self.down1(hidden_states)))
        hidden_states = F.relu(self.conv2(self.down2(hidden_states)))
        return self.out_fc(hidden_states)


class SimpleCNNDecoder(GradientCheckpointingLayer):
    """The paper's Table 4 decoder: conv3x3, [ReLU, convT2x2/2, conv3x3] x 2, ReLU, conv3x3 to `out_channels`."""

    def __init__(self, config):
        super().__init__()
        first, second, third = (config.base_channels * m for m in config.channel_multipliers)
        self.in_fc = _Conv2d(config.latent_channels, third, 3, padding=1)
        self.up1 = _ConvTransposeAfterReLU(third, second, 2, stride=2)
        self.conv1 = _Conv2d(second, second, 3, padding=1)
        self.up2 = _ConvTransposeAfterReLU(second, first, 2, stride=2)
        self.conv2 = _Conv2d(first, first, 3, padding=1)
        self.out_fc = _ConvAfterReLU(first, config.out_channels, 3, padding=1)

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """Weight of the last convolution (the VQGAN adaptive GAN weight is computed on it)."""
        return self.out_fc.weight

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        hidden_states = self.in_fc(latents)
        hidden_states = self.conv1(self.up1(F.relu(hidden_states)))
        hidden_states = self.conv2(self.up2(F.relu(hidden_states)))
        return self.out_fc(F.relu(hidden_states))


def build_backbone(config) -> tuple[nn.Module, nn.Module]:
    """The encoder and decoder an [`OptVQConfig`] describes."""
    if config.architecture == "vqgan":
        return VQGANEncoder(config), VQGANDecoder(config)
    if config.architecture == "simple_cnn":
        return SimpleCNNEncoder(config), SimpleCNNDecoder(config)
    raise ValueError(f"Unknown architecture {config.architecture!r}.")
