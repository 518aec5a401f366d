"""OptVQ as a drop-in `diffusers.VQModel`: [`OptVQVQModel`] and the `scaling_factor` helper.

[`OptVQVQModel`] is a subclass of `diffusers.VQModel` (so pipeline type hints and `isinstance` checks hold) built from
the same modules as [`OptVQModel`] (`optvq_hf.backbones.build_backbone`, the 1x1 quant convolutions and
`optvq_hf.quantization.build_quantizer`), with the same attribute names, so the two share one state dict and
convert both ways by a plain state-dict copy.

It implements the `VQModel` contract that diffusers pipelines rely on:

* `encode(x).latents`: pre-quantization latents `(B, embed_dim, h, w)` (encoder then `quant_conv`);
* `decode(h)`: quantize then decode; `decode(h, force_not_quantize=True)`: decode latents as given;
  `decode(token_ids, force_not_quantize=True, shape=(B, h, w, C))`: look integer token ids up (aMUSEd);
* `quantize(latents) -> (quantized, loss, (perplexity, None, token_ids))` and
  `quantize.get_codebook_entry(indices, shape)`;
* the config fields pipelines read: `block_out_channels`, `latent_channels`, `num_vq_embeddings`, `vq_embed_dim`,
  `scaling_factor`, `force_upcast`, `lookup_from_codebook`, `norm_num_groups`, `sample_size`, `in_channels`,
  `out_channels`.

Token-id layout (multi-head models): an OptVQ model with `num_heads` heads gives every latent position `num_heads`
tokens. Natively they are `(B, num_heads, h, w)`. Flattened, they follow raster order with the heads innermost
(position `(y, x)`, head `k` is at index `(y * w + x) * num_heads + k`), exactly the layout of
`OptVQModel.tokens_to_sequence` with `offset=0`. `quantize(latents)[2][2]` returns this flat layout and
`get_codebook_entry` / `decode(..., force_not_quantize=True, shape=(B, h, w, C))` accept it back in any shape
with `B * h * w * num_heads` elements (e.g. `(B, h * w * num_heads)`, `(B, h * w, num_heads)` or, for one head,
aMUSEd's `(B, h, w)`); a 4-D integer tensor is always read as the native `(B, num_heads, h, w)`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.autoencoders.vq_model import VQEncoderOutput, VQModel
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn
from transformers.utils import cached_file, logging

from .backbones import build_backbone
from .configuration_optvq import OptVQConfig
from .quantization import build_quantizer

logger = logging.get_logger(__name__)

__all__ = ["OptVQVQModel", "OptVQDiffusersQuantizer", "compute_scaling_factor", "OPTVQ_CONFIG_FIELDS"]

#: The [`OptVQConfig`] fields an [`OptVQVQModel`] config stores (all of them except `initializer_range`).
OPTVQ_CONFIG_FIELDS = (
    "architecture", "in_channels", "out_channels", "base_channels", "channel_multipliers", "num_res_blocks",
    "attn_resolutions", "resolution", "latent_channels", "dropout", "norm_num_groups", "norm_eps", "use_quant_conv",
    "embed_dim", "codebook_size", "num_heads", "use_codebook_projection", "quantizer_type", "epsilon", "num_iters",
    "normalization", "commitment_weight", "beta", "inference_assignment",
)
_DIFFUSERS_SETTINGS = ("scaling_factor", "force_upcast", "lookup_from_codebook")
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
# diffusers loading arguments that have no meaning for a transformers / original-layout folder.
_DIFFUSERS_ONLY_KWARGS = ("low_cpu_mem_usage", "use_safetensors", "output_loading_info", "variant", "mirror",
                          "max_memory", "offload_folder", "offload_state_dict", "disable_mmap", "quantization_config")


def _is_integer_tensor(tensor: torch.Tensor) -> bool:
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


class OptVQDiffusersQuantizer:
    """The `quantize` attribute of an [`OptVQVQModel`]: diffusers' `VectorQuantizer` interface over the model's
    OptVQ quantizer (`model.quantizer`). It owns no parameters (the weights stay under `quantizer.*`).

    Args:
        model ([`OptVQVQModel`]): the model whose quantizer to expose.
    """

    def __init__(self, model: "OptVQVQModel"):
        self._model = model

    @property
    def quantizer(self):
        """The underlying [`OptVQQuantizer`] / [`VectorQuantizer`] module."""
        return self._model.quantizer

    @property
    def n_e(self) -> int:
        """Number of codes (diffusers' name)."""
        return self.quantizer.codebook_size

    @property
    def vq_embed_dim(self) -> int:
        """Channels of the quantized latents (`embed_dim`)."""
        return self.quantizer.dim

    @property
    def codebook(self) -> torch.Tensor:
        """The codes in use, `(codebook_size, embed_dim // num_heads)`, float32."""
        return self.quantizer.codebook

    def __call__(self, latents: torch.Tensor):
        """Quantize latents `(B, embed_dim, h, w)` as diffusers' `VectorQuantizer.forward` does.

        Returns:
            `(quantized, loss, (perplexity, None, token_ids))`: `quantized` `(B, embed_dim, h, w)` with
            straight-through gradients, the scalar quantization loss, and the token ids flattened to
            `(B * h * w * num_heads,)` (raster order, heads innermost; see the module docstring).
        """
        self._model._check_latents(latents, "latents")
        output = self.quantizer(latents)
        flat_ids = output.token_ids.permute(0, 2, 3, 1).reshape(-1)
        return output.quantized, output.loss, (output.perplexity, None, flat_ids)

    def get_codebook_entry(self, indices: torch.LongTensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Latents of token ids, as diffusers' `VectorQuantizer.get_codebook_entry`.

        Args:
            indices (`torch.LongTensor`): token ids. A 4-D tensor is read as `(B, num_heads, h, w)`. Otherwise, with
                `shape`, any tensor of `B * h * w * num_heads` ids in raster order with heads innermost (for a
                single-head model aMUSEd's `(B, h, w)` or `(B * h * w,)`).
            shape (`tuple[int, int, int, int]`, *optional*): `(B, h, w, C)` with `C` either `embed_dim`
                (`vq_embed_dim`) or `latent_channels` (aMUSEd passes `config.latent_channels`); `C` is only checked,
                the result always has `embed_dim` channels.

        Returns:
            `torch.FloatTensor`: `(B, embed_dim, h, w)` when `shape` is given or `indices` is 4-D; otherwise (no
            `shape`, as in diffusers) the raw code vectors, `indices.shape + (embed_dim // num_heads,)`.
        """
        if not isinstance(indices, torch.Tensor) or not _is_integer_tensor(indices):
            kind = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise ValueError(f"`indices` must be an integer tensor of token ids, got {kind}.")
        if shape is None and indices.ndim != 4:
            quantizer = self.quantizer
            if indices.numel():
                low, high = int(indices.min()), int(indices.max())
                if low < 0 or high >= quantizer.codebook_size:
                    raise ValueError(
                        f"Token ids must lie in [0, {quantizer.codebook_size - 1}], got values in [{low}, {high}]."
                    )
            return nn.functional.embedding(indices.long(), quantizer.codebook)
        return self._model._token_ids_to_latents(indices, shape)


class OptVQVQModel(VQModel):
    r"""
    An OptVQ image tokenizer that is a `diffusers.VQModel`: use it as the `vqvae` of `LDMPipeline`,
    `LDMSuperResolutionPipeline` or `AmusedPipeline`, or the `movq` of the Kandinsky 2.2 decoder.

    The config stores every [`OptVQConfig`] field (the network is built from them with the same code as
    [`OptVQModel`]), the diffusers settings `scaling_factor`, `force_upcast` and `lookup_from_codebook`, and the
    diffusers names pipelines read, derived from the OptVQ fields (passing them is allowed only with consistent values):
    `block_out_channels` (`base_channels * m` per level, so `2 ** (len(block_out_channels) - 1)` is the downsampling
    factor), `num_vq_embeddings` (`codebook_size`), `vq_embed_dim` (`embed_dim`), `sample_size` (`resolution`),
    `layers_per_block` (`num_res_blocks`) and `norm_type` (`"group"`).

    Args:
        architecture, in_channels, out_channels, base_channels, channel_multipliers, num_res_blocks,
        attn_resolutions, resolution, latent_channels, dropout, norm_num_groups, norm_eps, use_quant_conv, embed_dim,
        codebook_size, num_heads, use_codebook_projection, quantizer_type, epsilon, num_iters, normalization,
        commitment_weight, beta, inference_assignment:
            The [`OptVQConfig`] fields of the same names (same defaults, same meaning, same validation).
        scaling_factor (`float`, *optional*, defaults to 1.0):
            Latent-diffusion scale: pipelines divide generated latents by it before `decode`. Compute it for your data
            with [`compute_scaling_factor`] (`1 / std` of the latents) and store it with
            `model.register_to_config(scaling_factor=...)`.
        force_upcast (`bool`, *optional*, defaults to `False`):
            Asks pipelines (aMUSEd) to decode in float32 when the model is in float16.
        lookup_from_codebook (`bool`, *optional*, defaults to `False`):
            diffusers' switch for decoding token ids with `decode(ids, force_not_quantize=True, shape=...)`; aMUSEd
            configs set it. Integer inputs are decoded as token ids whatever its value (diffusers' own `VQModel`
            would fail on them), floating inputs are always latents.
        block_out_channels, num_vq_embeddings, vq_embed_dim, sample_size, layers_per_block, norm_type (*optional*):
            Derived diffusers names (see above); `None` derives them.

    Example:

    ```python
    >>> import torch
    >>> from optvq_hf import OptVQConfig, OptVQModel, OptVQVQModel
    >>> optvq = OptVQModel(OptVQConfig.from_preset("optvq-mnist")).eval()
    >>> vqvae = OptVQVQModel.from_optvq(optvq)
    >>> latents = vqvae.encode(torch.rand(2, 1, 32, 32) * 2 - 1).latents  # (2, 8, 8, 8)
    >>> vqvae.decode(latents).sample.shape
    torch.Size([2, 1, 32, 32])
    ```
    """

    _skip_layerwise_casting_patterns = ["quantizer"]
    _supports_group_offloading = False
    _supports_gradient_checkpointing = True
    _keep_in_fp32_modules = ["quantizer"]
    _no_split_modules = ["OptVQResnetBlock", "OptVQAttnBlock", "OptVQQuantizer"]

    @register_to_config
    def __init__(
        self,
        architecture: str = "vqgan",
        in_channels: int = 3,
        out_channels: int = 3,
        base_channels: int = 128,
        channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        resolution: int = 256,
        latent_channels: int = 256,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        use_quant_conv: bool = True,
        embed_dim: int = 256,
        codebook_size: int = 16384,
        num_heads: int = 4,
        use_codebook_projection: bool = True,
        quantizer_type: str = "optvq",
        epsilon: float = 10.0,
        num_iters: int = 5,
        normalization: str = "all",
        commitment_weight: float = 1.0,
        beta: float = 0.25,
        inference_assignment: str = "nearest",
        scaling_factor: float = 1.0,
        force_upcast: bool = False,
        lookup_from_codebook: bool = False,
        block_out_channels: tuple[int, ...] | None = None,
        num_vq_embeddings: int | None = None,
        vq_embed_dim: int | None = None,
        sample_size: int | None = None,
        layers_per_block: int | None = None,
        norm_type: str | None = None,
    ):
        # Deliberately skip `VQModel.__init__`, which would build diffusers' own encoder/decoder/quantizer.
        ModelMixin.__init__(self)
        values = locals()
        optvq_config = OptVQConfig(**{name: values[name] for name in OPTVQ_CONFIG_FIELDS})
        if not isinstance(scaling_factor, (int, float)) or not math.isfinite(scaling_factor) or scaling_factor <= 0:
            raise ValueError(f"`scaling_factor` must be a positive finite number, got {scaling_factor!r}.")

        derived = {
            "block_out_channels": [base_channels * int(m) for m in optvq_config.channel_multipliers],
            "num_vq_embeddings": codebook_size,
            "vq_embed_dim": embed_dim,
            "sample_size": resolution,
            "layers_per_block": num_res_blocks,
            "norm_type": "group",
        }
        for name, expected in derived.items():
            given = values[name]
            if given is not None and (list(given) if isinstance(given, (list, tuple)) else given) != expected:
                raise ValueError(
                    f"`{name}` is derived from the OptVQ fields and must be {expected!r} for this config, "
                    f"got {given!r}."
                )
        self.register_to_config(
            channel_multipliers=list(optvq_config.channel_multipliers),
            attn_resolutions=list(optvq_config.attn_resolutions),
            scaling_factor=float(scaling_factor),
            **derived,
        )

        self.optvq_config = optvq_config
        self.encoder, self.decoder = build_backbone(optvq_config)
        if use_quant_conv:
            self.quant_conv = nn.Conv2d(latent_channels, embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(embed_dim, latent_channels, 1)
        else:
            self.quant_conv = nn.Identity()
            self.post_quant_conv = nn.Identity()
        self.quantizer = build_quantizer(optvq_config)

    # ----------------------------------------------------------------------------------------------------------
    # diffusers' `quantize` attribute
    # ----------------------------------------------------------------------------------------------------------
    @property
    def quantize(self) -> OptVQDiffusersQuantizer:
        """diffusers' `VectorQuantizer` interface (`quantize(latents)`, `quantize.get_codebook_entry(ids, shape)`).

        A plain object, not a submodule, so the weights appear once, under `quantizer.*`, as in [`OptVQModel`]."""
        adapter = self.__dict__.get("_quantize_adapter")
        if adapter is None:
            adapter = self.__dict__["_quantize_adapter"] = OptVQDiffusersQuantizer(self)
        return adapter

    # ----------------------------------------------------------------------------------------------------------
    # Checks and helpers
    # ----------------------------------------------------------------------------------------------------------
    @property
    def downsample_factor(self) -> int:
        """Ratio between image size and latent grid size."""
        return self.optvq_config.downsample_factor

    def _compute_dtype(self) -> torch.dtype:
        if self.config.use_quant_conv:
            return self.post_quant_conv.weight.dtype
        return next(self.decoder.parameters()).dtype

    def _check_sample(self, sample: torch.Tensor):
        config = self.config
        if not isinstance(sample, torch.Tensor):
            raise ValueError(f"`x` must be a torch.Tensor, got {type(sample).__name__}.")
        if sample.ndim != 4 or sample.shape[1] != config.in_channels:
            raise ValueError(
                f"`x` must have shape (B, {config.in_channels}, H, W) (in_channels={config.in_channels}), got "
                f"{tuple(sample.shape)}."
            )
        factor = self.downsample_factor
        if sample.shape[-2] % factor or sample.shape[-1] % factor:
            raise ValueError(
                f"Image height and width must be divisible by the downsampling factor {factor}, got "
                f"{sample.shape[-2]}x{sample.shape[-1]}."
            )
        if not sample.is_floating_point():
            raise ValueError(f"`x` must be floating point in [-1, 1], got dtype {sample.dtype}.")

    def _check_latents(self, latents: torch.Tensor, name: str):
        expected = self.config.embed_dim
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != expected:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"`{name}` must have shape (B, {expected}, h, w) (vq_embed_dim={expected}), got {shape}.")
        if not latents.is_floating_point():
            raise ValueError(f"`{name}` must be floating point, got dtype {latents.dtype}.")

    def _token_ids_to_latents(self, token_ids: torch.Tensor, shape=None) -> torch.Tensor:
        """Token ids (layouts in the module docstring) -> quantized latents `(B, embed_dim, h, w)`, float32."""
        config = self.config
        heads = config.num_heads
        if shape is not None:
            if len(shape) != 4 or not all(isinstance(s, int) or (torch.is_tensor(s) and s.numel() == 1) for s in shape):
                raise ValueError(f"`shape` must be (B, h, w, C), got {shape!r}.")
            batch, height, width, channels = (int(s) for s in shape)
            if channels not in (config.embed_dim, config.latent_channels):
                raise ValueError(
                    f"`shape[-1]` must be vq_embed_dim ({config.embed_dim}) or latent_channels "
                    f"({config.latent_channels}), got {channels} in shape {tuple(shape)}."
                )
        if token_ids.ndim == 4:
            if token_ids.shape[1] != heads or (
                shape is not None and tuple(token_ids.shape) != (batch, heads, height, width)
            ):
                expected = f"(B, num_heads={heads}, h, w)" if shape is None else str((batch, heads, height, width))
                raise ValueError(f"4-D token ids must have shape {expected}, got {tuple(token_ids.shape)}.")
            ids = token_ids
        elif shape is None:
            if token_ids.ndim == 3 and heads == 1:
                ids = token_ids.unsqueeze(1)
            else:
                raise ValueError(
                    f"Token ids of shape {tuple(token_ids.shape)} need `shape=(B, h, w, C)`; without it pass "
                    f"(B, num_heads={heads}, h, w)" + (" or (B, h, w)." if heads == 1 else ".")
                )
        else:
            expected = batch * height * width * heads
            if token_ids.numel() != expected:
                raise ValueError(
                    f"`shape` {tuple(shape)} with num_heads={heads} needs B*h*w*num_heads = {expected} token ids "
                    f"(raster order, heads innermost), got {token_ids.numel()} in shape {tuple(token_ids.shape)}."
                )
            ids = token_ids.reshape(batch, height, width, heads).permute(0, 3, 1, 2)
        return self.quantizer.embed_tokens(ids)

    # ----------------------------------------------------------------------------------------------------------
    # The VQModel contract
    # ----------------------------------------------------------------------------------------------------------
    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> VQEncoderOutput | tuple[torch.Tensor]:
        """Encode images to pre-quantization latents (encoder then `quant_conv`), as `VQModel.encode`.

        Args:
            x (`torch.FloatTensor` of shape `(B, in_channels, H, W)`): images in [-1, 1]; `H` and `W` divisible by
                `2 ** (len(config.block_out_channels) - 1)`.
            return_dict (`bool`, defaults to `True`): return a `VQEncoderOutput` rather than a tuple.

        Returns:
            `VQEncoderOutput` with `latents` of shape `(B, vq_embed_dim, H / f, W / f)`.
        """
        self._check_sample(x)
        hidden_states = self.encoder(x.to(self._compute_dtype()))
        latents = self.quant_conv(hidden_states)
        if not return_dict:
            return (latents,)
        return VQEncoderOutput(latents=latents)

    @apply_forward_hook
    def decode(
        self, h: torch.Tensor, force_not_quantize: bool = False, return_dict: bool = True, shape=None
    ) -> DecoderOutput | tuple[torch.Tensor, torch.Tensor]:
        """Decode latents or token ids to images, as `VQModel.decode`.

        Args:
            h (`torch.Tensor`): floating latents `(B, vq_embed_dim, h, w)`, or integer token ids (see the module
                docstring for the layouts; `shape` is needed unless they are `(B, num_heads, h, w)`, or `(B, h, w)` for
                a single-head model).
            force_not_quantize (`bool`, defaults to `False`): `False` quantizes floating latents first (nearest code,
                or Sinkhorn if `inference_assignment="sinkhorn"`); `True` decodes them as given (Kandinsky's `movq`).
            return_dict (`bool`, defaults to `True`): return a `DecoderOutput` rather than a tuple.
            shape (`tuple[int, int, int, int]`, *optional*): `(B, h, w, C)` for flat token ids (aMUSEd passes
                `(B, h, w, config.latent_channels)`).

        Returns:
            `DecoderOutput` with `sample` `(B, out_channels, H, W)` (nominally in [-1, 1]) and `commit_loss`: the
            quantization loss (a scalar) when quantizing, zeros `(B,)` otherwise.
        """
        if not isinstance(h, torch.Tensor):
            raise ValueError(f"`h` must be a torch.Tensor of latents or token ids, got {type(h).__name__}.")
        if _is_integer_tensor(h):
            quantized = self._token_ids_to_latents(h, shape)
            commit_loss = torch.zeros(quantized.shape[0], device=h.device, dtype=torch.float32)
        elif force_not_quantize:
            self._check_latents(h, "h")
            quantized = h
            commit_loss = torch.zeros(h.shape[0], device=h.device, dtype=h.dtype)
        else:
            self._check_latents(h, "h")
            output = self.quantizer(h)
            quantized, commit_loss = output.quantized, output.loss
        sample = self.decoder(self.post_quant_conv(quantized.to(self._compute_dtype())))
        if not return_dict:
            return sample, commit_loss
        return DecoderOutput(sample=sample, commit_loss=commit_loss)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor, ...]:
        """Encode, quantize and decode images, as `VQModel.forward`.

        Args:
            sample (`torch.FloatTensor` of shape `(B, in_channels, H, W)`): images in [-1, 1].
            return_dict (`bool`, defaults to `True`): return a `DecoderOutput` rather than `(sample, commit_loss)`.
        """
        latents = self.encode(sample).latents
        decoded = self.decode(latents)
        if not return_dict:
            return decoded.sample, decoded.commit_loss
        return decoded

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.LongTensor:
        """Token ids `(B, num_heads, h, w)` of images `(B, in_channels, H, W)` in [-1, 1] (eval-mode assignment
        unless the model is in training mode)."""
        return self.quantizer(self.encode(x).latents).token_ids

    # ----------------------------------------------------------------------------------------------------------
    # Conversion with OptVQModel
    # ----------------------------------------------------------------------------------------------------------
    def to_optvq_config(self) -> OptVQConfig:
        """The [`OptVQConfig`] this model's network is built from."""
        return OptVQConfig(**{name: self.config[name] for name in OPTVQ_CONFIG_FIELDS})

    @classmethod
    def from_optvq(cls, model, scaling_factor: float | None = None, force_upcast: bool = False,
                   lookup_from_codebook: bool = False) -> "OptVQVQModel":
        """Convert an [`OptVQModel`] (lossless: the weights are copied, dtypes and device kept).

        Args:
            model ([`OptVQModel`]): the model to convert.
            scaling_factor (`float`, *optional*): latent-diffusion scale to store (1.0 when omitted); see
                [`compute_scaling_factor`].
            force_upcast (`bool`, defaults to `False`): diffusers' `force_upcast` setting.
            lookup_from_codebook (`bool`, defaults to `False`): diffusers' `lookup_from_codebook` setting.
        """
        from .modeling_optvq import OptVQModel

        if not isinstance(model, OptVQModel):
            raise ValueError(f"`model` must be an OptVQModel, got {type(model).__name__}.")
        fields = {name: getattr(model.config, name) for name in OPTVQ_CONFIG_FIELDS}
        converted = cls(**fields, scaling_factor=1.0 if scaling_factor is None else scaling_factor,
                        force_upcast=force_upcast, lookup_from_codebook=lookup_from_codebook)
        _copy_weights(model, converted)
        return converted.train(model.training)

    def to_optvq(self):
        """Convert back to an [`OptVQModel`] (lossless: the weights are copied, dtypes and device kept). The diffusers
        settings (`scaling_factor`, ...) have no place in an `OptVQConfig` and are dropped."""
        from .modeling_optvq import OptVQModel

        model = OptVQModel(self.to_optvq_config())
        _copy_weights(self, model)
        return model.train(self.training)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "OptVQVQModel":
        """Load an `OptVQVQModel` folder (diffusers layout), or convert an [`OptVQModel`] folder (`config.json` with
        `model_type: "optvq"`) or an original-release folder (`BorelTHU/optvq-16x16x4` layout) on the fly.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a local folder or a Hub id.
            kwargs: for a diffusers folder, the usual `ModelMixin.from_pretrained` arguments. For an OptVQ or
                original folder: `scaling_factor`, `force_upcast`, `lookup_from_codebook` (stored in the diffusers
                config), `torch_dtype` / `dtype`, hub arguments (`revision`, `subfolder`, `cache_dir`, `token`,
                `local_files_only`, ...), and [`OptVQConfig`] overrides such as `inference_assignment`; diffusers-only
                loading arguments (`low_cpu_mem_usage`, `use_safetensors`, ...) are ignored there.
        """
        config_dict = _read_config_dict(pretrained_model_name_or_path, kwargs)
        if config_dict is None or not _is_optvq_or_original(config_dict):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

        from .modeling_optvq import OptVQModel

        settings = {key: kwargs.pop(key) for key in _DIFFUSERS_SETTINGS if key in kwargs}
        dtype = kwargs.pop("torch_dtype", None)
        if dtype is not None:
            kwargs.setdefault("dtype", dtype)
        if kwargs.get("variant") is not None:
            raise ValueError(f"`variant={kwargs['variant']!r}` applies to diffusers folders only.")
        for key in _DIFFUSERS_ONLY_KWARGS:
            kwargs.pop(key, None)
        optvq = OptVQModel.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls.from_optvq(optvq, **settings).eval()

    @torch.no_grad()
    def fit_scaling_factor(self, batches, max_batches: int | None = None) -> float:
        """Compute `scaling_factor` on data with [`compute_scaling_factor`] and store it in the config.

        Args:
            batches: a tensor `(B, in_channels, H, W)` in [-1, 1], or an iterable of such tensors (or of dicts /
                tuples whose first image tensor is used, e.g. a `DataLoader`).
            max_batches (`int`, *optional*): stop after this many batches.

        Returns:
            `float`: the stored `scaling_factor`.
        """
        value = compute_scaling_factor(self, batches, max_batches=max_batches)
        self.register_to_config(scaling_factor=value)
        return value


def _copy_weights(source: nn.Module, target: nn.Module):
    """Copy `source`'s state dict into `target` (same keys by construction), keeping dtypes and devices."""
    state = {key: value.detach().clone() for key, value in source.state_dict().items()}
    target_keys = set(target.state_dict())
    if set(state) != target_keys:
        raise ValueError(
            f"State dicts differ: missing {sorted(target_keys - set(state))[:5]}, unexpected "
            f"{sorted(set(state) - target_keys)[:5]}."
        )
    target.load_state_dict(state, strict=True, assign=True)


def _read_config_dict(path_or_id, kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
    if not isinstance(path_or_id, (str, os.PathLike)):
        return None
    hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs and kwargs[key] is not None}
    try:
        config_file = cached_file(
            str(path_or_id), "config.json", _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False, **hub_kwargs,
        )
    except (OSError, ValueError):
        return None
    if config_file is None:
        return None
    try:
        with open(config_file, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None
    return config if isinstance(config, dict) else None


def _is_optvq_or_original(config_dict: dict[str, Any]) -> bool:
    from .convert_original import is_original_config

    return config_dict.get("model_type") == OptVQConfig.model_type or is_original_config(config_dict)


def _first_image_tensor(batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key in ("pixel_values", "images", "image", "sample"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
        values = [value for value in batch.values() if isinstance(value, torch.Tensor) and value.ndim == 4]
    elif isinstance(batch, (list, tuple)):
        values = [value for value in batch if isinstance(value, torch.Tensor) and value.ndim == 4]
    else:
        values = []
    if not values:
        raise ValueError(
            f"Could not find a (B, C, H, W) image tensor in a batch of type {type(batch).__name__}; pass tensors, "
            "dicts with `pixel_values`, or tuples whose first 4-D tensor holds the images."
        )
    return values[0]


@torch.no_grad()
def compute_scaling_factor(vqvae, batches, max_batches: int | None = None) -> float:
    """`1 / std` of a VQ model's latents over data: the `scaling_factor` latent diffusion needs (LDM paper, D.1).

    Latent-diffusion pipelines generate `z` and decode `z / scaling_factor`, so a diffusion model is trained on
    `vqvae.encode(x).latents * scaling_factor`; this makes those latents unit-variance. The standard deviation is taken
    over all elements (batch, channels, positions) in float64, in eval mode, as Stable Diffusion's 0.18215 was.

    Args:
        vqvae (`diffusers.VQModel`, e.g. [`OptVQVQModel`]): any model with `encode(x).latents`.
        batches: a tensor `(B, in_channels, H, W)` in [-1, 1], or an iterable of tensors / dicts (key
            `pixel_values`, `images`, `image` or `sample`) / tuples (first 4-D tensor), e.g. a `DataLoader`.
        max_batches (`int`, *optional*): stop after this many batches.

    Returns:
        `float`: `1 / std`.
    """
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    elif not isinstance(batches, Iterable):
        raise ValueError(f"`batches` must be a tensor or an iterable of batches, got {type(batches).__name__}.")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"`max_batches` must be >= 1, got {max_batches}.")
    was_training = vqvae.training
    vqvae.eval()
    device = next(vqvae.parameters()).device
    count, total, total_sq = 0, 0.0, 0.0
    try:
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            images = _first_image_tensor(batch).to(device)
            latents = vqvae.encode(images).latents.double()
            count += latents.numel()
            total += float(latents.sum())
            total_sq += float((latents**2).sum())
    finally:
        vqvae.train(was_training)
    if count < 2:
        raise ValueError("`batches` gave fewer than 2 latent values; cannot compute a standard deviation.")
    variance = (total_sq - total**2 / count) / (count - 1)
    if not math.isfinite(variance) or variance <= 0:
        raise ValueError(f"The latents have zero (or non-finite) variance ({variance}); cannot compute a scale.")
    return 1.0 / math.sqrt(variance)
