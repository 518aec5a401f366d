"""Load and convert checkpoints of the original OptVQ release (e.g. `BorelTHU/optvq-16x16x4`).

The original repositories were saved with `huggingface_hub.PyTorchModelHubMixin`: a `config.json` with nested
`encoder` / `decoder` / `quantize` / `loss` dicts and a `model.safetensors` whose keys carry a `model.` prefix and
include training-only `loss.*` weights. This module maps both onto [`OptVQConfig`] / [`OptVQModel`].

Command line::

    python -m optvq_hf.convert_original --input BorelTHU/optvq-16x16x4 --output ./optvq-16x16x4-hf
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
from transformers.utils import cached_file, logging

from .codebook_losses import QUANTIZATION_LOSSES
from .configuration_optvq import OPTVQ_CONFIG_FIELDS, OptVQConfig
from .validation import check_weights_fit, weights_file_errors_named

logger = logging.get_logger(__name__)

ORIGINAL_SECTIONS = ("encoder", "decoder", "quantize")
#: The original quantizer classes' defaults for the keys a config may leave out (`VectorQuantizer` and
#: `VectorQuantizerSinkhorn` of the original code).
ORIGINAL_QUANTIZER_DEFAULTS = {"loss_q_type": "ce", "beta": 1.0, "use_prob": True}
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
_NORMALIZE_MODES = {"all": "all", "dim": "dim", "null": "none", "none": "none", None: "none"}
_RENAMES = (("quantize.proj.", "quantizer.projection."), ("quantize.embedding.", "quantizer.embedding."))


def is_original_config(config_dict: dict[str, Any]) -> bool:
    """Whether a `config.json` dict is in the original release's nested layout."""
    return (
        isinstance(config_dict, dict)
        and "model_type" not in config_dict
        and all(isinstance(config_dict.get(section), dict) for section in ORIGINAL_SECTIONS)
    )


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}


def read_config_dict(path_or_id, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The `config.json` dict at a local folder or Hub id (hub arguments taken from `kwargs`), or `None` when there is
    none (or it cannot be fetched). A `config.json` that is there but is not UTF-8 JSON holding an object raises a
    `ValueError` naming the file."""
    if not isinstance(path_or_id, (str, os.PathLike)):
        return None
    hub_kwargs = {key: value for key, value in _hub_kwargs(kwargs).items() if value is not None}
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
            config_dict = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_file} is not a UTF-8 JSON file: {error}") from error
    if not isinstance(config_dict, dict):
        raise ValueError(f"{config_file} must hold a JSON object (the config's fields), got {type(config_dict).__name__}.")
    return config_dict


def resolve_original_config(path_or_id, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The original-layout config dict at `path_or_id`, or `None` when it is not (or cannot be read as) one."""
    config_dict = read_config_dict(path_or_id, kwargs)
    return config_dict if is_original_config(config_dict) else None


_REQUIRED = object()


def _field(original: dict[str, Any], section: str, key: str, source: str, default=_REQUIRED):
    value = original[section].get(key, default)
    if value is _REQUIRED:
        raise ValueError(f"{source}: the original config lacks the required field `{section}.{key}`.")
    return value


def config_from_original(original: dict[str, Any], source: str = "the original config", **overrides) -> OptVQConfig:
    """Translate the original nested config into an [`OptVQConfig`] (overrides win). A missing or invalid field raises
    a `ValueError` naming `source` (e.g. the file) and the field (`quantize.e_dim`, ...)."""
    try:
        return _translate_original_config(original, source, **overrides)
    except (TypeError, ValueError) as error:  # e.g. OptVQConfig's validation of a translated value
        if str(error).startswith(source):
            raise
        raise ValueError(f"{source}: {error}") from error


def _translate_original_config(original: dict[str, Any], source: str, **overrides) -> OptVQConfig:
    encoder, decoder, quantize = (original[section] for section in ORIGINAL_SECTIONS)
    if encoder.get("double_z", False):
        raise ValueError("Original configs with `double_z=True` (a KL autoencoder) are not OptVQ models.")
    for key in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution"):
        if key in decoder and decoder[key] != encoder.get(key):
            raise ValueError(f"Encoder and decoder disagree on {key!r}: {encoder.get(key)} vs {decoder[key]}.")
    quantize_type = original.get("quantize_type", "optvq")
    if quantize_type not in ("optvq", "basevq"):
        raise ValueError(f"Unsupported original quantize_type {quantize_type!r} (expected 'optvq' or 'basevq').")
    # The original quantizer classes default to loss_q_type="ce"; its plain-VQ configs rely on that default.
    quantization_loss = quantize.get("loss_q_type", ORIGINAL_QUANTIZER_DEFAULTS["loss_q_type"])
    if quantization_loss not in QUANTIZATION_LOSSES:
        raise ValueError(f"Unsupported original loss_q_type {quantization_loss!r} (expected one of {QUANTIZATION_LOSSES}).")
    if quantize_type == "optvq" and quantize.get("use_prob", ORIGINAL_QUANTIZER_DEFAULTS["use_prob"]):
        logger.warning("Original use_prob=True sampled tokens from the plan; tokens are taken by argmax here.")
    if quantize.get("use_norm", False):
        raise ValueError("Original configs with `use_norm=True` are not supported (the original code refuses them too).")
    normalize_mode = quantize.get("normalize_mode", "all")
    if not isinstance(normalize_mode, (str, type(None))) or normalize_mode not in _NORMALIZE_MODES:
        raise ValueError(f"{source}: `quantize.normalize_mode` must be one of "
                         f"{sorted(mode for mode in _NORMALIZE_MODES if mode)} or null, got {normalize_mode!r}.")
    values = dict(
        architecture="vqgan",
        in_channels=encoder.get("in_channels", 3),
        out_channels=decoder.get("out_ch", 3),
        base_channels=_field(original, "encoder", "ch", source),
        channel_multipliers=list(_field(original, "encoder", "ch_mult", source)),
        num_res_blocks=_field(original, "encoder", "num_res_blocks", source),
        attn_resolutions=list(encoder.get("attn_resolutions", [])),
        resolution=encoder.get("resolution", 256),
        latent_channels=_field(original, "encoder", "z_channels", source),
        dropout=encoder.get("dropout", 0.0),
        use_quant_conv=original.get("use_connector", True),
        embed_dim=_field(original, "quantize", "e_dim", source),
        codebook_size=_field(original, "quantize", "n_e", source),
        num_heads=quantize.get("num_head", 1),
        use_codebook_projection=quantize.get("use_proj", True),
        quantizer_type="optvq" if quantize_type == "optvq" else "vq",
        epsilon=float(quantize.get("epsilon", 10.0)),
        num_iters=int(quantize.get("n_iters", 5)),
        normalization=_NORMALIZE_MODES[normalize_mode],
        commitment_weight=1.0,
        beta=float(quantize.get("beta", ORIGINAL_QUANTIZER_DEFAULTS["beta"])),
        quantization_loss=quantization_loss,
    )
    values.update(overrides)
    return OptVQConfig(**values)


def convert_original_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map original keys (`model.encoder...`, `model.quantize.proj...`) to [`OptVQModel`] keys.

    Training-only weights (`loss.discriminator.*`, `loss.perceptual_loss.*`) are dropped.
    """
    converted = {}
    for key, tensor in state_dict.items():
        name = key[len("model."):] if key.startswith("model.") else key
        if name.startswith("loss."):
            continue
        for old, new in _RENAMES:
            if name.startswith(old):
                name = new + name[len(old):]
        converted[name] = tensor
    return converted


def _load_weights(path_or_id, kwargs: dict[str, Any], weights_name: str = "model.safetensors",
                  bin_name: str = "pytorch_model.bin") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    hub_kwargs = _hub_kwargs(kwargs)
    weights_file = cached_file(
        str(path_or_id), weights_name, _raise_exceptions_for_missing_entries=False, **hub_kwargs
    )
    if weights_file is not None:
        with weights_file_errors_named(str(path_or_id)):
            return load_file(weights_file)
    bin_file = cached_file(
        str(path_or_id), bin_name, _raise_exceptions_for_missing_entries=False, **hub_kwargs
    )
    if bin_file is None:
        raise OSError(f"{path_or_id} has neither {weights_name} nor {bin_name}.")
    # Never unpickle arbitrary objects: tensors only.
    return torch.load(bin_file, map_location="cpu", weights_only=True)


def _split_loading_kwargs(kwargs: dict[str, Any], what: str):
    """`from_pretrained` keyword arguments -> `(dtype, device_map, initialize_missing_weights, hub kwargs,
    OptVQConfig overrides)`; anything else is a `TypeError`."""
    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    device_map = kwargs.pop("device_map", None)
    allow_missing = bool(kwargs.pop("initialize_missing_weights", False))
    hub_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in _HUB_KWARGS}
    kwargs.pop("trust_remote_code", None)
    config_overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in OPTVQ_CONFIG_FIELDS}
    if kwargs:
        raise TypeError(f"Unexpected arguments for loading {what}: {sorted(kwargs)}.")
    return dtype, device_map, allow_missing, hub_kwargs, config_overrides


def load_original_model(model_class, path_or_id, original_config: dict[str, Any], **kwargs):
    """Build `model_class` from an original-layout folder or Hub id, converting config and weights."""
    dtype, device_map, allow_missing, hub_kwargs, config_overrides = _split_loading_kwargs(
        kwargs, "an original OptVQ checkpoint")
    config = config_from_original(original_config, source=f"the config.json of {path_or_id}", **config_overrides)
    state_dict = convert_original_state_dict(_load_weights(path_or_id, hub_kwargs))
    model = model_class(config)
    load_converted_state_dict(model, state_dict, source=str(path_or_id), allow_missing=allow_missing)
    logger.info(
        "Converted the original-layout OptVQ checkpoint %s on the fly (nested config, `model.`-prefixed keys; "
        "training-only `loss.*` weights dropped). Save it with `save_pretrained` to skip this next time.",
        path_or_id,
    )
    model = _place(model, dtype, device_map)
    return model.eval()


def is_diffusers_config(config_dict: dict[str, Any] | None) -> bool:
    """Whether a `config.json` dict is an [`OptVQVQModel`] saved by diffusers (`save_pretrained` of the diffusers
    front end: `_class_name`, the OptVQ fields and the `VQModel` names derived from them)."""
    return isinstance(config_dict, dict) and config_dict.get("_class_name") == "OptVQVQModel"


def load_diffusers_model(model_class, path_or_id, config_dict: dict[str, Any], **kwargs):
    """Build `model_class` from a diffusers-layout [`OptVQVQModel`] folder or Hub id (`config.json` +
    `diffusion_pytorch_model.safetensors`). Both front ends share one state dict, so the weights load as they are;
    the diffusers-only settings (`scaling_factor`, ...) are dropped. Needs no diffusers install."""
    dtype, device_map, allow_missing, hub_kwargs, config_overrides = _split_loading_kwargs(
        kwargs, "a diffusers-layout OptVQ model")
    values = {key: config_dict[key] for key in OPTVQ_CONFIG_FIELDS if key in config_dict}
    config = OptVQConfig(**{**values, **config_overrides})
    state_dict = _load_weights(path_or_id, hub_kwargs, "diffusion_pytorch_model.safetensors",
                               "diffusion_pytorch_model.bin")
    model = model_class(config)
    load_converted_state_dict(model, state_dict, source=str(path_or_id), allow_missing=allow_missing)
    return _place(model, dtype, device_map).eval()


def load_converted_state_dict(model, state_dict: dict[str, torch.Tensor], source: str = "the checkpoint",
                              allow_missing: bool = False):
    """`load_state_dict` that reports missing and mis-shaped weights as one `ValueError` naming them (see
    `optvq_hf.validation.check_weights_fit`); with `allow_missing`, missing weights keep their initialization."""
    own = model.state_dict()
    mismatched = [(key, state_dict[key].shape, own[key].shape) for key in set(own) & set(state_dict)
                  if own[key].shape != state_dict[key].shape]
    unexpected = set(state_dict) - set(own)
    check_weights_fit(source, missing=set(own) - set(state_dict), mismatched=mismatched, unexpected=unexpected,
                      allow_missing=allow_missing)
    if unexpected:
        raise ValueError(f"The weights in {source} hold tensors the model does not have: {sorted(unexpected)[:10]}.")
    model.load_state_dict(state_dict, strict=not allow_missing)


def _place(model, dtype, device_map):
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype) and dtype != torch.float32:
        quantizer = model.quantizer
        model.to(dtype)
        quantizer.float()  # the quantizer always computes in float32 (`_keep_in_fp32_modules`)
    if device_map is not None:
        if isinstance(device_map, dict):
            devices = set(device_map.values())
            if len(devices) != 1:
                raise ValueError("Original-layout checkpoints load onto a single device; pass one device in device_map.")
            device_map = devices.pop()
        if device_map == "auto":
            device_map = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device_map)
    return model


def convert(input_path_or_id: str, output_dir: str, **kwargs) -> str:
    """Convert an original checkpoint to a native folder (config, safetensors, image processor, model card)."""
    from .image_processing_optvq import OptVQImageProcessor
    from .modeling_optvq import OptVQModel

    original_config = resolve_original_config(input_path_or_id, kwargs)
    if original_config is None:
        raise ValueError(f"{input_path_or_id} is not an original-layout OptVQ checkpoint (nested encoder/decoder/quantize config).")
    model = load_original_model(OptVQModel, input_path_or_id, original_config, **kwargs)
    model.save_pretrained(output_dir, source_checkpoint=str(input_path_or_id))
    OptVQImageProcessor.from_model_config(model.config).save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description="Convert an original OptVQ checkpoint to an optvq-hf folder.")
    parser.add_argument("--input", required=True, help="Hub id (e.g. BorelTHU/optvq-16x16x4) or local folder.")
    parser.add_argument("--output", required=True, help="Folder to write the converted model to.")
    parser.add_argument("--revision", default=None, help="Hub revision of the input.")
    parser.add_argument(
        "--inference_assignment", choices=("nearest", "sinkhorn"), default="nearest",
        help="Token assignment at inference stored in the converted config.",
    )
    args = parser.parse_args(argv)
    kwargs = {"inference_assignment": args.inference_assignment}
    if args.revision:
        kwargs["revision"] = args.revision
    output = convert(args.input, args.output, **kwargs)
    print(f"Wrote the converted model to {os.path.abspath(output)}")


if __name__ == "__main__":
    main()
