"""Networks behind the perceptual metrics: LPIPS (a VGG-style trunk plus learned per-layer weights) and the image
feature extractor of rFID. Both load from a local folder or a Hub repository holding `config.json` and
`model.safetensors`; both can be built small and random for tests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["LPIPSNetwork", "ImageFeatureExtractor", "load_feature_extractor", "VGG16_STAGES"]

# torchvision's vgg16 `features`: LPIPS taps the ReLU after the last convolution of each stage.
VGG16_STAGES = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]
# LPIPS's input scaling (inputs in [-1, 1]).
LPIPS_SHIFT = [-0.030, -0.088, -0.188]
LPIPS_SCALE = [0.458, 0.448, 0.450]


def _resolve_file(name_or_path: str, filename: str, **hub_kwargs) -> str:
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        if not os.path.isfile(path):
            raise ValueError(f"{name_or_path!r} has no {filename!r}.")
        return path
    from huggingface_hub import hf_hub_download

    return hf_hub_download(name_or_path, filename, **hub_kwargs)


class LPIPSNetwork(nn.Module):
    """LPIPS (Zhang et al. 2018): distance between unit-normalized trunk activations, weighted per channel by learned
    non-negative 1x1 convolutions, averaged over space and summed over layers.

    The trunk is a VGG-style stack whose `features` indices follow torchvision's `vgg16().features`, so a torchvision
    VGG16 state dict loads as is; the learned weights of the `lpips` package's `vgg.pth` (`linK.model.1.weight`) load
    as `lins.K.weight` (see [`LPIPSNetwork.from_original_state_dicts`]).

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
        self.lins = nn.ModuleList(nn.Conv2d(stage[-1], 1, 1, bias=False) for stage in stages)
        self.register_buffer("shift", torch.tensor(shift).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(scale).view(1, -1, 1, 1), persistent=False)

    def _taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        hidden = (images - self.shift) / self.scale
        taps = []
        for index, layer in enumerate(self.features):
            hidden = layer(hidden)
            if index in self.tap_indices:
                taps.append(hidden)
        return taps

    def forward(self, predictions: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """LPIPS distance `(B,)` between images `(B, C, H, W)` in `[-1, 1]`."""
        if predictions.shape != references.shape:
            raise ValueError(f"LPIPS inputs must match, got {tuple(predictions.shape)} and {tuple(references.shape)}.")
        in_channels = self.config["in_channels"]
        if predictions.shape[1] == 1 and in_channels != 1:
            predictions, references = predictions.expand(-1, in_channels, -1, -1), references.expand(-1, in_channels, -1, -1)
        if predictions.shape[1] != in_channels:
            raise ValueError(f"LPIPS expects {in_channels} (or 1) channels, got {predictions.shape[1]}.")
        dtype = self.lins[0].weight.dtype
        distance = predictions.new_zeros(predictions.shape[0], dtype=dtype)
        for lin, tap_x, tap_y in zip(self.lins, self._taps(predictions.to(dtype)), self._taps(references.to(dtype))):
            unit_x = tap_x / (tap_x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            unit_y = tap_y / (tap_y.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            distance = distance + lin((unit_x - unit_y) ** 2).mean(dim=(1, 2, 3))
        return distance

    def save_pretrained(self, save_directory: str):
        """Write `config.json` and `model.safetensors` to `save_directory`."""
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, "config.json"), "w") as handle:
            json.dump({"model_type": "lpips", **self.config}, handle, indent=2)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()},
                  os.path.join(save_directory, "model.safetensors"))

    @classmethod
    def from_pretrained(cls, name_or_path: str, **hub_kwargs) -> "LPIPSNetwork":
        """Load from a local folder or a Hub repository with `config.json` and `model.safetensors`."""
        with open(_resolve_file(name_or_path, "config.json", **hub_kwargs)) as handle:
            config = json.load(handle)
        config.pop("model_type", None)
        network = cls(**config)
        state = load_file(_resolve_file(name_or_path, "model.safetensors", **hub_kwargs))
        network.load_state_dict(state)
        return network.eval().requires_grad_(False)

    @classmethod
    def from_original_state_dicts(cls, vgg_state_dict: dict, lin_state_dict: dict) -> "LPIPSNetwork":
        """Build the standard VGG LPIPS from torchvision's `vgg16` weights and the `lpips` package's `vgg.pth`
        (both plain tensors dicts, e.g. read with `torch.load(path, weights_only=True)`)."""
        network = cls()
        state = {k: v for k, v in vgg_state_dict.items() if k.startswith("features.")}
        for index in range(len(network.lins)):
            state[f"lins.{index}.weight"] = lin_state_dict[f"lin{index}.model.1.weight"]
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
    with open(_resolve_file(name_or_path, "config.json", **hub_kwargs)) as handle:
        config = json.load(handle)
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
