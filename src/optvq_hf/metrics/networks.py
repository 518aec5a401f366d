"""Networks behind the perceptual metrics and loss: LPIPS (a VGG-style trunk plus learned per-layer weights), used
by the `lpips` metric and by the training loss, and the image feature extractor of rFID. Both load from a local
folder or a Hub repository holding `config.json` and `model.safetensors`; both can be built small and random for
tests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["LPIPSNetwork", "ImageFeatureExtractor", "load_feature_extractor", "VGG16_STAGES", "LPIPS_WEIGHTS_NAME"]

# torchvision's vgg16 `features`: LPIPS taps the ReLU after the last convolution of each stage.
VGG16_STAGES = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]
# LPIPS's input scaling (inputs in [-1, 1]).
LPIPS_SHIFT = [-0.030, -0.088, -0.188]
LPIPS_SCALE = [0.458, 0.448, 0.450]
# The single-file layout of the standard VGG LPIPS (no config.json): torchvision's `features.*` and the `lpips`
# package's `lin{k}.model.1.weight`, the keys every LPIPSNetwork state dict has.
LPIPS_WEIGHTS_NAME = "lpips_vgg.safetensors"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _resolve_file(name_or_path: str, filename: str, **hub_kwargs) -> str:
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        if not os.path.isfile(path):
            raise ValueError(f"{name_or_path!r} has no {filename!r}.")
        return path
    from huggingface_hub import hf_hub_download

    return hf_hub_download(name_or_path, filename, **hub_kwargs)


def _read_config(name_or_path: str, **hub_kwargs) -> dict:
    """`config.json` of a folder or Hub repository."""
    with open(_resolve_file(name_or_path, CONFIG_NAME, **hub_kwargs)) as handle:
        return json.load(handle)


def _save_folder(module: nn.Module, config: dict, save_directory: str):
    """Write `config.json` (`config`) and `model.safetensors` (the state dict) to `save_directory`."""
    os.makedirs(save_directory, exist_ok=True)
    with open(os.path.join(save_directory, CONFIG_NAME), "w") as handle:
        json.dump(config, handle, indent=2)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, os.path.join(save_directory, WEIGHTS_NAME))


def _from_other_lpips_format(state_dict: dict) -> dict:
    """Rename the learned heads of the earlier metrics format (`lins.{k}.weight`) to `lin{k}.model.1.weight`."""
    renamed = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "lins" and parts[1].isdigit() and parts[2] == "weight":
            key = f"lin{parts[1]}.model.1.weight"
        renamed[key] = value
    return renamed


class _LinHead(nn.Module):
    """LPIPS's learned per-channel weighting of one layer: dropout then a bias-free 1x1 conv to one channel (the
    `lpips` package's layout, hence the `model.1` in its parameter name)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(0.0), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.model(hidden_states)


class LPIPSNetwork(nn.Module):
    """LPIPS (Zhang et al. 2018): distance between unit-normalized trunk activations, weighted per channel by learned
    non-negative 1x1 convolutions, averaged over space and summed over layers.

    The trunk is a VGG-style stack whose `features` indices follow torchvision's `vgg16().features`, and the heads
    are named as in the `lpips` package (`lin{k}.model.1.weight`), so torchvision's VGG16 weights and the `lpips`
    package's `vgg.pth` load as they are (see [`LPIPSNetwork.from_original_state_dicts`]). This is the one LPIPS of
    the project: the `lpips` metric uses it and the training loss ([`optvq_hf.training.LPIPS`]) is a frozen subclass.

    Args:
        stages (`list[list[int]]`, defaults to VGG16's): output channels of the convolutions of each stage; a
            max-pooling precedes every stage but the first, and the activation after each stage is tapped.
        in_channels (`int`, defaults to 3): input channels of the trunk (grayscale inputs are repeated to fit).
        shift, scale (`list[float]`): per-channel input normalization `(x - shift) / scale` of `[-1, 1]` inputs.
    """

    def __init__(self, stages: Sequence[Sequence[int]] = VGG16_STAGES, in_channels: int = 3,
                 shift: Sequence[float] = LPIPS_SHIFT, scale: Sequence[float] = LPIPS_SCALE):
        super().__init__()
        if not stages or any(not stage for stage in stages):
            raise ValueError(f"`stages` must be a non-empty list of non-empty channel lists, got {stages}.")
        if len(shift) != in_channels or len(scale) != in_channels:
            raise ValueError(f"`shift` and `scale` need {in_channels} entries, got {len(shift)} and {len(scale)}.")
        self.config = {"stages": [list(map(int, s)) for s in stages], "in_channels": int(in_channels),
                       "shift": [float(v) for v in shift], "scale": [float(v) for v in scale]}
        layers: list[nn.Module] = []
        self.tap_indices: list[int] = []
        channels = in_channels
        for stage_index, stage in enumerate(stages):
            if stage_index > 0:
                layers.append(nn.MaxPool2d(2, 2))
            for width in stage:
                layers += [nn.Conv2d(channels, int(width), 3, padding=1), nn.ReLU()]
                channels = int(width)
            self.tap_indices.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        for index, stage in enumerate(stages):
            self.add_module(f"lin{index}", _LinHead(int(stage[-1])))
        self.register_buffer("shift", torch.tensor(shift).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(scale).view(1, -1, 1, 1), persistent=False)

    @property
    def lins(self) -> list[nn.Conv2d]:
        """The learned 1x1 convolutions, one per tapped layer."""
        return [getattr(self, f"lin{index}").model[1] for index in range(len(self.tap_indices))]

    def forward(self, predictions: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """LPIPS distance `(B,)` between images `(B, C, H, W)` in `[-1, 1]` (1-channel images are repeated)."""
        if predictions.shape != references.shape:
            raise ValueError(f"LPIPS inputs must match, got {tuple(predictions.shape)} and {tuple(references.shape)}.")
        in_channels = self.config["in_channels"]
        if predictions.ndim != 4 or predictions.shape[1] not in (1, in_channels):
            raise ValueError(f"LPIPS expects (B, 1 or {in_channels}, H, W) images, got {tuple(predictions.shape)}.")
        if predictions.shape[1] != in_channels:
            predictions = predictions.expand(-1, in_channels, -1, -1)
            references = references.expand(-1, in_channels, -1, -1)
        hidden = (torch.cat([predictions, references]).to(self.shift.dtype) - self.shift) / self.scale
        distance, tap = 0.0, 0
        for index, layer in enumerate(self.features):
            hidden = layer(hidden)
            if index == self.tap_indices[tap]:
                first, second = hidden.chunk(2)
                first = first / (first.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                second = second / (second.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                distance = distance + getattr(self, f"lin{tap}")((first - second) ** 2).mean(dim=(1, 2, 3))
                tap += 1
        return distance

    def save_pretrained(self, save_directory: str):
        """Write `config.json` and `model.safetensors` to `save_directory`."""
        _save_folder(self, {"model_type": "lpips", **self.config}, save_directory)

    @classmethod
    def from_pretrained(cls, name_or_path: str, filename: str | None = None, **hub_kwargs) -> "LPIPSNetwork":
        """Load from a `.safetensors` file, a local folder or a Hub repository.

        A folder or repository holds `config.json` + `model.safetensors` (what [`save_pretrained`] writes), or
        `lpips_vgg.safetensors` alone (the standard VGG LPIPS, the training loss's layout). Weights saved by earlier
        versions of the metric (heads named `lins.{k}.weight`) are converted while loading. Frozen, in eval mode.

        Args:
            name_or_path (`str`): a file, a local folder or a Hub repository id.
            filename (`str`, *optional*): the weights file inside the folder or repository. Default:
                `model.safetensors`, else `lpips_vgg.safetensors`. A
                `config.json` next to the weights is used when it describes an LPIPS network; otherwise the layout
                is VGG16's.
            hub_kwargs: passed to `huggingface_hub.hf_hub_download` (`revision`, `token`, `cache_dir`, ...).
        """
        if os.path.isfile(name_or_path):
            path, folder = name_or_path, os.path.dirname(os.path.abspath(name_or_path))
        elif os.path.isdir(name_or_path):
            candidates = [filename] if filename else [WEIGHTS_NAME, LPIPS_WEIGHTS_NAME]
            found = [name for name in candidates if os.path.isfile(os.path.join(name_or_path, name))]
            if not found:
                raise ValueError(f"No LPIPS weights: expected {' or '.join(map(repr, candidates))} in folder "
                                 f"{name_or_path!r}.")
            path, folder = os.path.join(name_or_path, found[0]), name_or_path
        elif filename is not None:
            path, folder = _resolve_file(name_or_path, filename, **hub_kwargs), None
        else:
            from huggingface_hub.errors import EntryNotFoundError

            try:
                path, folder = _resolve_file(name_or_path, WEIGHTS_NAME, **hub_kwargs), None
            except EntryNotFoundError:  # a repository holding the single-file layout
                filename = LPIPS_WEIGHTS_NAME
                path, folder = _resolve_file(name_or_path, filename, **hub_kwargs), None
        config = {}
        if folder is None and filename in (None, WEIGHTS_NAME):
            config = _read_config(name_or_path, **hub_kwargs)
        elif folder is not None and os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            config = _read_config(folder)
        config = {k: v for k, v in config.items() if k != "model_type"} if config.get("model_type") == "lpips" else {}
        network = cls(**config)
        try:
            network.load_state_dict(_from_other_lpips_format(load_file(path)))
        except RuntimeError as error:  # missing, unexpected or mis-shaped keys
            raise ValueError(f"LPIPS weights in {path!r} do not match the network layout {network.config['stages']}: "
                             f"{error}") from error
        return network.eval().requires_grad_(False)

    @classmethod
    def from_original_state_dicts(cls, vgg_state_dict: dict, lin_state_dict: dict) -> "LPIPSNetwork":
        """Build the standard VGG LPIPS from torchvision's `vgg16` weights and the `lpips` package's `vgg.pth`
        (both plain tensors dicts, e.g. read with `torch.load(path, weights_only=True)`)."""
        network = cls()
        state = {k: v for k, v in vgg_state_dict.items() if k.startswith("features.")}
        for index in range(len(network.tap_indices)):
            key = f"lin{index}.model.1.weight"
            state[key] = lin_state_dict[key]
        network.load_state_dict(state)
        return network.eval().requires_grad_(False)


class ImageFeatureExtractor(nn.Module):
    """Wraps a network that maps images to feature vectors, for rFID.

    Images arrive in `[0, 1]`, `(B, C, H, W)`; grayscale is repeated to `in_channels`, the batch is resized
    (bilinear) to `image_size` when set, normalized `(x - mean) / std`, passed through `network`, and flattened to
    `(B, D)` (a 4-D output is average-pooled over space first).

    Args:
        network (`nn.Module`): the feature network.
        image_size (`int`, *optional*): square input size the network expects (299 for Inception-v3).
        mean, std (`list[float]`, *optional*): input normalization; defaults map `[0, 1]` to `[-1, 1]`.
        in_channels (`int`, defaults to 3): channels the network expects.
    """

    def __init__(self, network: nn.Module, image_size: int | None = None, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), in_channels: int = 3):
        super().__init__()
        self.network = network
        self.image_size = image_size
        self.in_channels = in_channels
        self.register_buffer("mean", torch.tensor(list(mean)[:in_channels]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)[:in_channels]).view(1, -1, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, unit_images: torch.Tensor) -> torch.Tensor:
        images = unit_images
        if images.shape[1] == 1 and self.in_channels != 1:
            images = images.expand(-1, self.in_channels, -1, -1)
        parameter = next(self.network.parameters(), None)
        dtype = parameter.dtype if parameter is not None else torch.float32
        device = parameter.device if parameter is not None else images.device
        images = images.to(device=device, dtype=dtype)
        if self.image_size is not None and tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            images = nn.functional.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                               align_corners=False)
        images = (images - self.mean.to(images)) / self.std.to(images)
        output = self.network(images)
        if not isinstance(output, torch.Tensor):
            # transformers outputs: prefer the pooled output, else mean-pool the last hidden state.
            pooled = getattr(output, "pooler_output", None)
            output = pooled if pooled is not None else output.last_hidden_state.mean(dim=1)
        if output.ndim == 4:
            output = output.mean(dim=(2, 3))
        return output.flatten(1).double().cpu()


def load_feature_extractor(name_or_path, device: str | torch.device = "cpu", **hub_kwargs) -> ImageFeatureExtractor:
    """The rFID feature network.

    Args:
        name_or_path: an [`ImageFeatureExtractor`] or `nn.Module` (used as is, wrapped), a local folder or a Hub
            repository. A folder whose `config.json` has `"model_type": "inception_v3"` loads our Inception-v3 (the
            FID network, see [`optvq_hf.metrics.inception`]); any other `config.json` is loaded with transformers'
            `AutoModel` and `AutoImageProcessor` settings (image size, mean, std).
        device: where to run it.
        hub_kwargs: passed to `hf_hub_download` / `from_pretrained` (`revision`, `token`, `cache_dir`,
            `local_files_only`).
    """
    if isinstance(name_or_path, ImageFeatureExtractor):
        return name_or_path.to(device).eval()
    if isinstance(name_or_path, nn.Module):
        return ImageFeatureExtractor(name_or_path).to(device).eval()
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(f"`feature_extractor` must be an nn.Module, a folder or a Hub id, got {type(name_or_path)}.")
    name_or_path = os.fspath(name_or_path)
    config = _read_config(name_or_path, **hub_kwargs)
    if config.get("model_type") == "inception_v3":
        from .inception import InceptionV3

        network = InceptionV3.from_pretrained(name_or_path, **hub_kwargs)
        extractor = ImageFeatureExtractor(network, image_size=299)
    else:
        from transformers import AutoImageProcessor, AutoModel

        network = AutoModel.from_pretrained(name_or_path, **hub_kwargs)
        size, mean, std = None, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        try:
            processor = AutoImageProcessor.from_pretrained(name_or_path, **hub_kwargs)
            crop = getattr(processor, "crop_size", None) or getattr(processor, "size", None) or {}
            size = crop.get("height") or crop.get("shortest_edge")
            mean, std = processor.image_mean or mean, processor.image_std or std
        except (OSError, ValueError):
            pass
        extractor = ImageFeatureExtractor(network, image_size=size, mean=mean, std=std,
                                          in_channels=getattr(network.config, "num_channels", 3))
    return extractor.to(device).eval()
