"""Inception-v3 trunk for FID, in plain torch (no torchvision).

The layout and parameter names follow torchvision's `Inception3` (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.
running_mean`, ...), and `fid_variant=True` reproduces the pooling differences of the TensorFlow FID graph that
`pytorch-fid` ports (average pools that exclude padding in the A/C/E blocks, a max pool in the last E block). So the
weights of `pytorch-fid`'s `pt_inception-2015-12-05` (or torchvision's `inception_v3`) load as they are:

    state = torch.load("pt_inception-2015-12-05-6726825d.pth", weights_only=True)
    InceptionV3.from_state_dict(state).save_pretrained("fid-inception")   # config.json + model.safetensors

and `optvq_hf.metrics.load("rfid", feature_extractor="fid-inception")` (a local folder or a Hub repository) then
computes features on 299x299 inputs scaled to [-1, 1]: the 2048-d pool features of the FID convention.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from .networks import WEIGHTS_NAME, _read_config, _resolve_file, _save_folder

__all__ = ["InceptionV3"]


class _Conv(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x, fid):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=not fid)


class _BlockA(nn.Module):
    def __init__(self, in_channels, pool_features, fid):
        super().__init__()
        self.fid = fid
        self.branch1x1 = _Conv(in_channels, 64, 1)
        self.branch5x5_1 = _Conv(in_channels, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(in_channels, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(in_channels, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x, self.fid)),
        ], 1)


class _BlockB(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = _Conv(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(in_channels, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class _BlockC(nn.Module):
    def __init__(self, in_channels, channels_7x7, fid):
        super().__init__()
        self.fid = fid
        c7 = channels_7x7
        self.branch1x1 = _Conv(in_channels, 192, 1)
        self.branch7x7_1 = _Conv(in_channels, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(in_channels, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(in_channels, 192, 1)

    def forward(self, x):
        double = x
        for name in ("branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5"):
            double = getattr(self, name)(double)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(_avg_pool(x, self.fid)),
        ], 1)


class _BlockD(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = _Conv(in_channels, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(in_channels, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        branch = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), branch, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):
    def __init__(self, in_channels, pool: str):
        super().__init__()
        self.pool = pool  # "avg" (torchvision), "avg_exclude_pad" (FID, first E block), "max" (FID, last E block)
        self.branch1x1 = _Conv(in_channels, 320, 1)
        self.branch3x3_1 = _Conv(in_channels, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(in_channels, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(in_channels, 192, 1)

    def forward(self, x):
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.pool == "max":
            pooled = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=self.pool == "avg")
        return torch.cat([
            self.branch1x1(x),
            torch.cat([self.branch3x3_2a(single), self.branch3x3_2b(single)], 1),
            torch.cat([self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double)], 1),
            self.branch_pool(pooled),
        ], 1)


class InceptionV3(nn.Module):
    """Inception-v3 up to its 2048-d average pool (the FID feature).

    Args:
        fid_variant (`bool`, defaults to `True`): use the pooling of the TensorFlow FID graph (as `pytorch-fid`);
            `False` gives torchvision's `inception_v3`.

    Input: `(B, 3, H, W)` already normalized (for FID: 299x299 in [-1, 1], see `ImageFeatureExtractor`).
    Output: `(B, 2048)`.
    """

    def __init__(self, fid_variant: bool = True):
        super().__init__()
        self.config = {"model_type": "inception_v3", "fid_variant": bool(fid_variant)}
        fid = bool(fid_variant)
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _BlockA(192, 32, fid)
        self.Mixed_5c = _BlockA(256, 64, fid)
        self.Mixed_5d = _BlockA(288, 64, fid)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, 128, fid)
        self.Mixed_6c = _BlockC(768, 160, fid)
        self.Mixed_6d = _BlockC(768, 160, fid)
        self.Mixed_6e = _BlockC(768, 192, fid)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, "avg_exclude_pad" if fid else "avg")
        self.Mixed_7c = _BlockE(2048, "max" if fid else "avg")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    @classmethod
    def from_state_dict(cls, state_dict: dict, fid_variant: bool = True) -> "InceptionV3":
        """Build from a torchvision / pytorch-fid state dict (classifier `fc.*` and `AuxLogits.*` keys are dropped)."""
        network = cls(fid_variant=fid_variant)
        state = {k: v for k, v in state_dict.items() if not k.startswith(("fc.", "AuxLogits."))}
        network.load_state_dict(state)
        return network.eval().requires_grad_(False)

    def save_pretrained(self, save_directory: str):
        """Write `config.json` and `model.safetensors`."""
        _save_folder(self, self.config, save_directory)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **hub_kwargs) -> "InceptionV3":
        """Load from a local folder or a Hub repository with `config.json` and `model.safetensors`."""
        config = _read_config(name_or_path, **hub_kwargs)
        network = cls(fid_variant=config.get("fid_variant", True))
        network.load_state_dict(load_file(_resolve_file(name_or_path, WEIGHTS_NAME, **hub_kwargs)))
        return network.eval().requires_grad_(False)
