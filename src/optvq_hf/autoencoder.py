"""The OptVQ autoencoder core: the modules, the input checks and the steps every front end is made of.

`pixel_values (B, C, H, W)` -> `encoder` -> `quant_conv` -> latents `(B, embed_dim, h, w)` -> `quantizer` ->
token ids `(B, num_heads, h, w)` and quantized latents -> `post_quant_conv` -> `decoder` -> pixels.

[`OptVQAutoencoderMixin`] builds these modules from an [`OptVQConfig`] under the names of the checkpoint layout
(`encoder.*`, `quant_conv.*`, `quantizer.*`, `post_quant_conv.*`, `decoder.*`), checks inputs and runs the steps.
The front ends are thin over it: [`OptVQModel`] (transformers) and [`OptVQVQModel`] (diffusers) each inherit it next
to their library's base class, check an input once at their public methods, then call the unchecked steps. Since
they share the module names, one state dict serves both.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbones import build_backbone
from .configuration_optvq import OptVQConfig
from .quantization import QuantizerOutput, build_quantizer
from .validation import MAX_FEATURE_MAGNITUDE, check_finite, check_token_ids

__all__ = ["OptVQAutoencoderMixin"]


class OptVQAutoencoderMixin:
    """Modules, input checks and encode / quantize / decode / token-lookup steps of an OptVQ autoencoder.

    A front end (an `nn.Module`) calls `_build_autoencoder(config)` in its `__init__` and provides `optvq_config`.
    Methods named `check_*` validate inputs and raise `ValueError`s naming the argument; the steps
    (`encode_latents` apart, which checks its pixels) trust their input.
    """

    #: Blocks that device maps must not split (the quantizer's class is added per instance).
    _backbone_no_split_modules = ["OptVQResnetBlock", "OptVQAttnBlock"]

    def _build_autoencoder(self, config: OptVQConfig):
        self.encoder, self.decoder = build_backbone(config)
        if config.use_quant_conv:
            self.quant_conv = nn.Conv2d(config.latent_channels, config.embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(config.embed_dim, config.latent_channels, 1)
        else:
            self.quant_conv = nn.Identity()
            self.post_quant_conv = nn.Identity()
        # float32 whatever the default dtype (`from_config(config, dtype=torch.bfloat16)` sets it while building)
        self.quantizer = build_quantizer(config).float()
        self._no_split_modules = self._backbone_no_split_modules + [type(self.quantizer).__name__]

    @property
    def optvq_config(self) -> OptVQConfig:
        """The [`OptVQConfig`] the network is built from."""
        raise NotImplementedError

    # ---- input checks -----------------------------------------------------------------------------------------
    def check_pixel_values(self, pixel_values: torch.Tensor, name: str = "pixel_values", check_values: bool = True):
        """Raise a `ValueError` unless `pixel_values` is a finite float `(B, in_channels, H, W)` tensor with `H`, `W`
        divisible by the downsampling factor (finiteness as in `optvq_hf.validation.check_finite`; skipped with
        `check_values=False`)."""
        config = self.optvq_config
        channels = config.in_channels
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"`{name}` must be a torch.Tensor, got {type(pixel_values).__name__}.")
        if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"`{name}` must have shape (B, {channels}, H, W) ({channels} channels: in_channels={channels}), got "
                f"{tuple(pixel_values.shape)}."
            )
        factor = config.downsample_factor
        height, width = pixel_values.shape[-2:]
        if height % factor or width % factor:
            raise ValueError(
                f"Image height and width must be divisible by the downsampling factor {factor}, got {height}x{width}."
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"`{name}` must be floating point in [-1, 1], got dtype {pixel_values.dtype}.")
        if check_values:
            check_finite(pixel_values, f"`{name}`", self.training)

    def check_latents(self, latents: torch.Tensor, name: str = "latents", quantize: bool = False):
        """Raise a `ValueError` unless `latents` is a finite float `(B, embed_dim, h, w)` tensor (at most
        `MAX_FEATURE_MAGNITUDE` in magnitude when it is to be quantized); finiteness as in
        `optvq_hf.validation.check_finite`."""
        expected = self.optvq_config.embed_dim
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != expected:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"`{name}` must have shape (B, {expected}, h, w) (embed_dim={expected}), got {shape}.")
        if not latents.is_floating_point():
            raise ValueError(f"`{name}` must be floating point, got dtype {latents.dtype}.")
        check_finite(latents, f"`{name}`", self.training, MAX_FEATURE_MAGNITUDE if quantize else None)

    def check_token_ids(self, token_ids: torch.Tensor, shape=None, name: str = "Token ids") -> torch.LongTensor:
        """Validate token ids and return them as `(B, num_heads, h, w)` int64.

        Accepted: `(B, num_heads, h, w)`; `(B, h, w)` for a single-head model; with `shape=(B, h, w, C)` (`C` =
        `embed_dim` or `latent_channels`, only checked), any tensor of `B * h * w * num_heads` ids in raster order
        with the heads innermost (the flat layout of `OptVQModel.tokens_to_sequence`).
        """
        config = self.optvq_config
        heads = config.num_heads
        check_token_ids(token_ids, None, name)
        if shape is not None:
            if len(shape) != 4 or not all(isinstance(s, int) or (torch.is_tensor(s) and s.numel() == 1) for s in shape):
                raise ValueError(f"`shape` must be (B, h, w, C), got {shape!r}.")
            batch, height, width, channels = (int(s) for s in shape)
            if channels not in (config.embed_dim, config.latent_channels):
                raise ValueError(
                    f"`shape[-1]` must be vq_embed_dim ({config.embed_dim}) or latent_channels "
                    f"({config.latent_channels}), got {channels} in shape {tuple(shape)}."
                )
        if token_ids.ndim == 3 and heads == 1 and shape is None:
            token_ids = token_ids.unsqueeze(1)
        if token_ids.ndim == 4:
            if token_ids.shape[1] != heads or (
                shape is not None and tuple(token_ids.shape) != (batch, heads, height, width)
            ):
                expected = f"(B, num_heads={heads}, h, w)" if shape is None else str((batch, heads, height, width))
                raise ValueError(f"4-D {name} must have shape {expected}, got {tuple(token_ids.shape)}.")
        elif shape is None:
            raise ValueError(
                f"{name} must have shape (B, num_heads={heads}, h, w)" + (" or (B, h, w)" if heads == 1 else "")
                + f", got {tuple(token_ids.shape)} (flat ids need `shape=(B, h, w, C)` where accepted)."
            )
        elif token_ids.numel() != batch * height * width * heads:
            raise ValueError(
                f"`shape` {tuple(shape)} with num_heads={heads} needs B*h*w*num_heads = "
                f"{batch * height * width * heads} token ids (raster order, heads innermost), got {token_ids.numel()} "
                f"in shape {tuple(token_ids.shape)}."
            )
        else:
            token_ids = token_ids.reshape(batch, height, width, heads).permute(0, 3, 1, 2)
        return check_token_ids(token_ids, config.codebook_size, name).long()

    # ---- the steps --------------------------------------------------------------------------------------------
    def encode_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pre-quantization latents `(B, embed_dim, h, w)` (encoder then `quant_conv`); checks `pixel_values`."""
        self.check_pixel_values(pixel_values, check_values=False)
        hidden_states = self.encoder(pixel_values.to(next(self.encoder.parameters()).dtype))
        latents = self.quant_conv(hidden_states)
        # One check, of the latents the quantizer gets (NaN pixels give NaN latents; finite pixels far outside [-1, 1]
        # can overflow the encoder or the quantizer's loss); its error names the pixels.
        try:
            check_finite(latents, "latents", self.training, MAX_FEATURE_MAGNITUDE)
        except ValueError as error:
            check_finite(pixel_values, "`pixel_values`")
            raise ValueError(
                f"The latents the encoder computed from `pixel_values` are unusable ({error}) `pixel_values` should "
                f"lie in [-1, 1]; got values in [{float(pixel_values.min()):.3g}, {float(pixel_values.max()):.3g}]."
            ) from None
        return latents

    def quantize_latents(self, latents: torch.Tensor) -> QuantizerOutput:
        """Quantize latents `(B, embed_dim, h, w)` (unchecked); returns the quantizer's [`QuantizerOutput`]."""
        return self.quantizer(latents, check_input=False)

    def decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        """Pixels `(B, out_channels, h*f, w*f)` of latents `(B, embed_dim, h, w)` (`post_quant_conv` then decoder)."""
        quantized = quantized.to(next(self.decoder.parameters()).dtype)
        return self.decoder(self.post_quant_conv(quantized))

    def embed_token_ids(self, token_ids: torch.Tensor, shape=None) -> torch.Tensor:
        """Quantized latents `(B, embed_dim, h, w)`, float32, of token ids (layouts of `check_token_ids`)."""
        return self.quantizer.embed_tokens(self.check_token_ids(token_ids, shape), check_input=False)

    # ---- conversion between front ends ------------------------------------------------------------------------
    def _copy_weights_from(self, source: nn.Module):
        """Copy `source`'s weights (same module names by construction), keeping their dtypes and devices."""
        state = {key: value.detach().clone() for key, value in source.state_dict().items()}
        own = set(self.state_dict())
        if set(state) != own:
            missing, unexpected = sorted(own - set(state))[:5], sorted(set(state) - own)[:5]
            raise ValueError(f"State dicts differ: missing {missing}, unexpected {unexpected}.")
        self.load_state_dict(state, strict=True, assign=True)

