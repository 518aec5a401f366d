"""OptVQ as a drop-in `diffusers.VQModel`: [`OptVQVQModel`], a `VQModel` subclass around the shared autoencoder core
([`~optvq_hf.autoencoder.OptVQAutoencoderMixin`], as [`OptVQModel`]: same modules and names, one state dict).

It keeps the `VQModel` contract pipelines rely on: `encode(x).latents` (pre-quantization), `decode(h)` (quantize, then
decode), `decode(h, force_not_quantize=True)`, `decode(token_ids, force_not_quantize=True, shape=(B, h, w, C))`
(aMUSEd), `quantize(latents) -> (quantized, loss, (perplexity, None, token_ids))`, `quantize.get_codebook_entry`.
Token ids: natively `(B, num_heads, h, w)`; flat, raster order with heads innermost (`(y * w + x) * num_heads + k`, as
`OptVQModel.tokens_to_sequence`), which `quantize(...)[2][2]` returns and decoding takes back given `shape`.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.autoencoders.vq_model import VQEncoderOutput, VQModel
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

from .autoencoder import OptVQAutoencoderMixin
from .configuration_optvq import OPTVQ_CONFIG_FIELDS, OptVQConfig
from .latent_scaling import compute_scaling_factor
from .validation import check_token_ids, check_weights_fit, is_integer_tensor

__all__ = ["OptVQVQModel", "OptVQDiffusersQuantizer", "compute_scaling_factor", "OPTVQ_CONFIG_FIELDS"]

# diffusers loading arguments without meaning for a transformers / original-layout folder
_DIFFUSERS_ONLY_KWARGS = ("low_cpu_mem_usage", "use_safetensors", "output_loading_info", "variant", "mirror",
                          "max_memory", "offload_folder", "offload_state_dict", "disable_mmap", "quantization_config")


class OptVQDiffusersQuantizer:
    """The `quantize` attribute of an [`OptVQVQModel`]: diffusers' `VectorQuantizer` interface over the model's
    quantizer (`model.quantizer`). It owns no parameters (the weights stay under `quantizer.*`)."""

    def __init__(self, model: "OptVQVQModel"):
        self._model = model

    quantizer = property(lambda self: self._model.quantizer, doc="The model's quantizer (a `CodebookQuantizer`).")
    n_e = property(lambda self: self.quantizer.codebook_size, doc="Number of codes (diffusers' name).")
    vq_embed_dim = property(lambda self: self.quantizer.dim, doc="Channels of the quantized latents (`embed_dim`).")
    codebook = property(lambda self: self.quantizer.codebook, doc="The codes in use, `(codebook_size, code_dim)`.")

    def __call__(self, latents: torch.Tensor):
        """Quantize latents `(B, embed_dim, h, w)`: `(quantized, loss, (perplexity, None, flat token ids))`."""
        self._model.check_latents(latents, "latents", quantize=True)
        output = self._model.quantize_latents(latents)
        return output.quantized, output.loss, (output.perplexity, None, output.token_ids.permute(0, 2, 3, 1).flatten())

    def get_codebook_entry(self, indices: torch.LongTensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Latents `(B, embed_dim, h, w)` of token ids, as diffusers' `VectorQuantizer.get_codebook_entry`.

        Args:
            indices (`torch.LongTensor`): a 4-D `(B, num_heads, h, w)` tensor, or (with `shape`) flat ids.
            shape (`tuple[int, int, int, int]`, *optional*): `(B, h, w, C)`, `C` = `embed_dim` or
                `latent_channels` (only checked). Without it and for non-4-D ids, the raw code vectors
                `indices.shape + (embed_dim // num_heads,)`, as in diffusers.
        """
        check_token_ids(indices, None, "`indices`")
        if shape is None and indices.ndim != 4:
            return nn.functional.embedding(check_token_ids(indices, self.n_e).long(), self.codebook)
        return self._model.embed_token_ids(indices, shape)


def _derived_names(config: OptVQConfig) -> dict:
    """The diffusers config names pipelines read, derived from the OptVQ fields."""
    return dict(block_out_channels=[config.base_channels * int(m) for m in config.channel_multipliers],
                num_vq_embeddings=config.codebook_size, vq_embed_dim=config.embed_dim, sample_size=config.resolution,
                layers_per_block=config.num_res_blocks, norm_type="group")


_DERIVED_NAMES = tuple(_derived_names(OptVQConfig()))


def _with_optvq_fields(init):
    """Declare every [`OptVQConfig`] field (with its default) and every derived diffusers name (default `None`) as a
    keyword argument of `init`: diffusers builds and reloads the config from the signature, so the fields are
    declared once, in `OptVQConfig`."""
    optvq, keyword = inspect.signature(OptVQConfig.__init__).parameters, inspect.Parameter.KEYWORD_ONLY
    own = [p for name, p in inspect.signature(init).parameters.items() if name != "fields"]
    fields = [optvq[name].replace(kind=keyword) for name in OPTVQ_CONFIG_FIELDS]
    derived = [inspect.Parameter(name, keyword, default=None) for name in _DERIVED_NAMES]
    init.__signature__ = inspect.Signature(own[:1] + fields + own[1:] + derived)
    return init


class OptVQVQModel(OptVQAutoencoderMixin, VQModel):
    r"""
    An OptVQ image tokenizer that is a `diffusers.VQModel`: the `vqvae` of `LDMPipeline`, `LDMSuperResolutionPipeline`
    or `AmusedPipeline`, or the `movq` of the Kandinsky 2.2 decoder.

    Args:
        fields: every [`OptVQConfig`] field (`OPTVQ_CONFIG_FIELDS`), keyword arguments with the same defaults and
            validation: the signature is derived from `OptVQConfig`'s.
        scaling_factor (`float`, defaults to 1.0): latent-diffusion scale (pipelines decode `latents / scaling_factor`);
            see [`compute_scaling_factor`] and `fit_scaling_factor`.
        force_upcast (`bool`, defaults to `False`): asks pipelines (aMUSEd) to decode in float32.
        lookup_from_codebook (`bool`, defaults to `False`): diffusers' switch for decoding token ids (integer inputs are
            token ids whatever its value, floating inputs latents).
        block_out_channels, num_vq_embeddings, vq_embed_dim, sample_size, layers_per_block, norm_type (*optional*):
            the names pipelines read, derived from the OptVQ fields (`base_channels * m` per level, `codebook_size`,
            `embed_dim`, `resolution`, `num_res_blocks`, `"group"`); a given value must equal the derived one.

    Example:

    ```python
    >>> import torch
    >>> from optvq_hf import OptVQConfig, OptVQModel, OptVQVQModel
    >>> vqvae = OptVQVQModel.from_optvq(OptVQModel(OptVQConfig.from_preset("optvq-mnist")).eval())
    >>> vqvae.decode(vqvae.encode(torch.rand(2, 1, 32, 32) * 2 - 1).latents).sample.shape
    torch.Size([2, 1, 32, 32])
    ```
    """

    _skip_layerwise_casting_patterns = ["quantizer"]
    _supports_group_offloading = False
    _supports_gradient_checkpointing = True
    _keep_in_fp32_modules = ["quantizer"]
    _no_split_modules = ["OptVQResnetBlock", "OptVQAttnBlock", "OptVQQuantizer"]  # per instance: its quantizer's class

    @register_to_config
    @_with_optvq_fields
    def __init__(self, *, scaling_factor: float = 1.0, force_upcast: bool = False, lookup_from_codebook: bool = False,
                 **fields):
        ModelMixin.__init__(self)  # not VQModel.__init__, which would build diffusers' own networks
        given = {name: fields.pop(name) for name in _DERIVED_NAMES if name in fields}
        config = OptVQConfig(**fields)
        if not isinstance(scaling_factor, (int, float)) or not 0 < scaling_factor < float("inf"):
            raise ValueError(f"`scaling_factor` must be a positive finite number, got {scaling_factor!r}.")
        derived = _derived_names(config)
        for name, value in given.items():
            if value is not None and (list(value) if isinstance(value, (list, tuple)) else value) != derived[name]:
                raise ValueError(f"`{name}` is derived from the OptVQ fields and must be {derived[name]!r} for this "
                                 f"config, got {value!r}.")
        self.register_to_config(channel_multipliers=config.channel_multipliers, scaling_factor=float(scaling_factor),
                                attn_resolutions=config.attn_resolutions, **derived)
        self._optvq_config = config
        self._build_autoencoder(config)

    optvq_config = property(lambda self: self._optvq_config, doc="The `OptVQConfig` of the network.")
    downsample_factor = property(lambda self: self._optvq_config.downsample_factor, doc="Image size / latent size.")

    @property
    def quantize(self) -> OptVQDiffusersQuantizer:
        """diffusers' `VectorQuantizer` interface; a plain object, so the weights appear once, under `quantizer.*`."""
        return OptVQDiffusersQuantizer(self)

    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> VQEncoderOutput | tuple[torch.Tensor]:
        """Pre-quantization latents `(B, vq_embed_dim, H / f, W / f)` of images `(B, in_channels, H, W)` in [-1, 1]."""
        latents = self.encode_latents(x)
        return VQEncoderOutput(latents=latents) if return_dict else (latents,)

    @apply_forward_hook
    def decode(self, h: torch.Tensor, force_not_quantize: bool = False, return_dict: bool = True,
               shape=None) -> DecoderOutput | tuple[torch.Tensor, torch.Tensor]:
        """Decode latents or token ids to images `(B, out_channels, H, W)`, as `VQModel.decode`: a `DecoderOutput`
        (or `(sample, commit_loss)`), `commit_loss` being the quantization loss when quantizing, zeros `(B,)` else.

        Args:
            h (`torch.Tensor`): floating latents `(B, vq_embed_dim, h, w)`, or integer token ids (module docstring).
            force_not_quantize (`bool`, defaults to `False`): `False` quantizes floating latents first (nearest code,
                or Sinkhorn with `inference_assignment="sinkhorn"`); `True` decodes them as given (Kandinsky's movq).
            return_dict (`bool`, defaults to `True`): return a `DecoderOutput` rather than a tuple.
            shape (`tuple[int, int, int, int]`, *optional*): `(B, h, w, C)` for flat token ids (aMUSEd).
        """
        if is_integer_tensor(h):
            quantized = self.embed_token_ids(h, shape)
            commit_loss = torch.zeros(quantized.shape[0], device=h.device, dtype=torch.float32)
        elif force_not_quantize:
            self.check_latents(h, "h")
            quantized, commit_loss = h, torch.zeros(h.shape[0], device=h.device, dtype=h.dtype)
        else:
            self.check_latents(h, "h", quantize=True)
            output = self.quantize_latents(h)
            quantized, commit_loss = output.quantized, output.loss
        sample = self.decode_latents(quantized)
        return DecoderOutput(sample=sample, commit_loss=commit_loss) if return_dict else (sample, commit_loss)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor, ...]:
        """Encode, quantize and decode images `(B, in_channels, H, W)` in [-1, 1], as `VQModel.forward`."""
        output = self.quantize_latents(self.encode_latents(sample))
        decoded = self.decode_latents(output.quantized)
        return DecoderOutput(sample=decoded, commit_loss=output.loss) if return_dict else (decoded, output.loss)

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.LongTensor:
        """Token ids `(B, num_heads, h, w)` of images `(B, in_channels, H, W)` in [-1, 1]."""
        return self.quantize_latents(self.encode_latents(x)).token_ids

    # ---- conversion with OptVQModel ---------------------------------------------------------------------------
    def to_optvq_config(self) -> OptVQConfig:
        """The [`OptVQConfig`] this model's network is built from."""
        return OptVQConfig(**{name: self.config[name] for name in OPTVQ_CONFIG_FIELDS})

    @classmethod
    def from_optvq(cls, model, scaling_factor: float | None = None, force_upcast: bool = False,
                   lookup_from_codebook: bool = False) -> "OptVQVQModel":
        """Convert an [`OptVQModel`] (lossless: every config field and the weights, dtypes and devices kept); the
        other arguments are the diffusers settings to store."""
        from .modeling_optvq import OptVQModel

        if not isinstance(model, OptVQModel):
            raise ValueError(f"`model` must be an OptVQModel, got {type(model).__name__}.")
        converted = cls(**{name: getattr(model.config, name) for name in OPTVQ_CONFIG_FIELDS},
                        scaling_factor=1.0 if scaling_factor is None else scaling_factor, force_upcast=force_upcast,
                        lookup_from_codebook=lookup_from_codebook)
        converted._copy_weights_from(model)
        return converted.train(model.training)

    def to_optvq(self):
        """Convert back to an [`OptVQModel`] (lossless); the diffusers settings have no place there and are dropped."""
        from .modeling_optvq import OptVQModel

        model = OptVQModel(self.to_optvq_config())
        model._copy_weights_from(self)
        return model.train(self.training)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "OptVQVQModel":
        """Load an `OptVQVQModel` folder (diffusers layout), or convert an [`OptVQModel`] folder or an original-release
        folder on the fly. For the latter two, `kwargs` are `scaling_factor`, `force_upcast`, `lookup_from_codebook`,
        `torch_dtype` / `dtype`, the hub arguments and [`OptVQConfig`] overrides; diffusers-only loading arguments
        (`low_cpu_mem_usage`, ...) are ignored there."""
        from .convert_original import is_original_config, read_config_dict
        from .modeling_optvq import OptVQModel

        config_dict = read_config_dict(pretrained_model_name_or_path, kwargs)  # raises if unreadable
        if config_dict is not None and config_dict.get("model_type") not in (None, OptVQConfig.model_type):
            raise ValueError(f"{pretrained_model_name_or_path} holds a model of type {config_dict['model_type']!r}, "
                             f"not an OptVQ model.")
        if config_dict is not None and "_class_name" in config_dict and "quantizer_type" not in config_dict:
            raise ValueError(f"{pretrained_model_name_or_path} holds a diffusers {config_dict['_class_name']}, not an "
                             f"OptVQVQModel (its config has no OptVQ fields).")
        if config_dict is None or (config_dict.get("model_type") is None and not is_original_config(config_dict)):
            return cls._from_diffusers_folder(pretrained_model_name_or_path, kwargs)
        settings = {key: kwargs.pop(key) for key in ("scaling_factor", "force_upcast", "lookup_from_codebook")
                    if key in kwargs}
        dtype = kwargs.pop("torch_dtype", None)
        if dtype is not None:
            kwargs.setdefault("dtype", dtype)
        if kwargs.get("variant") is not None:
            raise ValueError(f"`variant={kwargs['variant']!r}` applies to diffusers folders only.")
        kwargs = {key: value for key, value in kwargs.items() if key not in _DIFFUSERS_ONLY_KWARGS}
        return cls.from_optvq(OptVQModel.from_pretrained(pretrained_model_name_or_path, **kwargs), **settings).eval()

    @classmethod
    def _from_diffusers_folder(cls, pretrained_model_name_or_path, kwargs) -> "OptVQVQModel":
        """`ModelMixin.from_pretrained`, refusing (`ValueError`, naming them) weights the folder lacks or holds with
        another shape, unless `initialize_missing_weights=True` / `ignore_mismatched_sizes=True`: diffusers would
        leave a missing weight on the `meta` device, to fail inside torch at the first call."""
        allow_missing = bool(kwargs.pop("initialize_missing_weights", False))
        output_loading_info = bool(kwargs.pop("output_loading_info", False))
        try:
            model, loading_info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True,
                                                          **kwargs)
        except ValueError as error:  # diffusers names the first mismatched tensor: list them all, both shapes
            if "shape" not in str(error):
                raise
            cls._raise_for_mismatches(pretrained_model_name_or_path, kwargs)
            raise ValueError(f"The weights in {pretrained_model_name_or_path} do not fit the model's config: "
                             f"{error}") from error
        check_weights_fit(str(pretrained_model_name_or_path), missing=loading_info["missing_keys"],
                          mismatched=loading_info.get("mismatched_keys", ()),
                          unexpected=loading_info["unexpected_keys"], allow_missing=allow_missing,
                          allow_mismatched=bool(kwargs.get("ignore_mismatched_sizes", False)))
        if loading_info["missing_keys"]:  # initialize them (diffusers leaves them on `meta`)
            fresh = cls.from_config(model.config).state_dict()
            own = model.state_dict()
            model.load_state_dict({key: fresh[key].to(own[key].dtype) for key in loading_info["missing_keys"]},
                                  strict=False, assign=True)
        return (model, loading_info) if output_loading_info else model

    @classmethod
    def _raise_for_mismatches(cls, pretrained_model_name_or_path, kwargs):
        """Compare the shapes in the folder's safetensors files with the model its config builds (on `meta`)."""
        import glob
        import os

        from safetensors import safe_open

        folder = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not os.path.isdir(folder) or not files:
            return
        with torch.device("meta"):
            expected = {name: tuple(t.shape) for name, t in cls.from_config(cls.load_config(folder)).state_dict().items()}
        found = {}
        for path in files:
            with safe_open(path, framework="pt") as handle:
                found.update({name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})
        check_weights_fit(str(pretrained_model_name_or_path),
                          mismatched=[(n, found[n], expected[n]) for n in set(found) & set(expected)
                                      if found[n] != expected[n]],
                          unexpected=set(found) - set(expected), allow_missing=True)

    @torch.no_grad()
    def fit_scaling_factor(self, batches, max_batches: int | None = None) -> float:
        """Compute `scaling_factor` on data with [`compute_scaling_factor`] (tensors, or an iterable of tensors,
        dicts or tuples), store it in the config and return it."""
        value = compute_scaling_factor(self, batches, max_batches=max_batches)
        self.register_to_config(scaling_factor=value)
        return value
