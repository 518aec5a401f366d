"""Image processor for OptVQ: resize, center-crop, scale to [-1, 1]; and back to PIL / uint8."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling
from transformers.processing_utils import ImagesKwargs, Unpack

__all__ = ["OptVQImageProcessor"]

# ITU-R 601-2 luma, as PIL's "L" mode.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class OptVQImageProcessorKwargs(ImagesKwargs, total=False):
    """
    num_channels (`int`, *optional*):
        Channels of the output `pixel_values`: 3 (RGB) or 1 (grayscale, e.g. MNIST models).
    """

    num_channels: int


class OptVQImageProcessor(PilBackend):
    r"""
    Prepares images for [`OptVQModel`]: convert to RGB (or grayscale), resize the shortest edge, center-crop, and
    map to `pixel_values` in [-1, 1] (`(x / 255 - 0.5) / 0.5`). [`~OptVQImageProcessor.postprocess`] maps model
    outputs back to PIL images, uint8 arrays or float tensors.

    Args:
        do_resize (`bool`, *optional*, defaults to `True`): resize so that the shortest edge is `size["shortest_edge"]`
            (or to exactly `size["height"] x size["width"]`).
        size (`dict[str, int]`, *optional*, defaults to `{"shortest_edge": 256}`): target size of the resize.
        resample (`PILImageResampling`, *optional*, defaults to `BICUBIC`): resampling filter.
        do_center_crop (`bool`, *optional*, defaults to `True`): center-crop to `crop_size`.
        crop_size (`dict[str, int]`, *optional*, defaults to `{"height": 256, "width": 256}`): crop size.
        do_rescale (`bool`, *optional*, defaults to `True`): multiply by `rescale_factor` (1/255).
        do_normalize (`bool`, *optional*, defaults to `True`): subtract `image_mean` (0.5) and divide by `image_std`
            (0.5), which maps [0, 1] to [-1, 1].
        do_convert_rgb (`bool`, *optional*, defaults to `True`): convert inputs to RGB first (then to grayscale when
            `num_channels=1`). `False` keeps the input's channels as they are (e.g. 4-channel arrays, with 4-entry
            `image_mean` / `image_std`).
        num_channels (`int`, *optional*, defaults to 3): 3 for RGB models, 1 for grayscale models.
    """

    valid_kwargs = OptVQImageProcessorKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    size = {"shortest_edge": 256}
    default_to_square = False
    crop_size = {"height": 256, "width": 256}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    num_channels = 3

    def __init__(self, **kwargs: Unpack[OptVQImageProcessorKwargs]):
        num_channels = kwargs.get("num_channels", self.num_channels)
        if num_channels not in (1, 3):
            raise ValueError(f"`num_channels` must be 1 or 3, got {num_channels}.")
        if num_channels == 1:
            kwargs.setdefault("image_mean", [0.5])
            kwargs.setdefault("image_std", [0.5])
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, config, **kwargs) -> "OptVQImageProcessor":
        """The processor matching a model config: its `resolution` and `in_channels`."""
        defaults = dict(
            size={"shortest_edge": config.resolution},
            crop_size={"height": config.resolution, "width": config.resolution},
            num_channels=config.in_channels,
        )
        return cls(**{**defaults, **kwargs})

    @classmethod
    def from_pretrained_or_model_config(cls, pretrained_model_name_or_path, config,
                                        **kwargs) -> "OptVQImageProcessor":
        """The processor saved next to a model (`preprocessor_config.json` at a folder or Hub id), or, when there is
        none (diffusers-layout and original-release folders have none), the one built from its config
        ([`~OptVQImageProcessor.from_model_config`]).

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): the model's folder or Hub id.
            config (`OptVQConfig`): the loaded model's config (used when no processor is saved).
            kwargs: hub arguments of `from_pretrained` (`revision`, `subfolder`, `cache_dir`, `token`, ...).
        """
        try:
            return cls.from_pretrained(pretrained_model_name_or_path, **kwargs)
        except (OSError, ValueError):
            return cls.from_model_config(config)

    def process_image(self, image, do_convert_rgb=None, input_data_format=None, **kwargs) -> np.ndarray:
        num_channels = kwargs.pop("num_channels", None) or self.num_channels
        do_convert_rgb = self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb
        array = super().process_image(image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format,
                                      **kwargs)
        if num_channels == 1 and do_convert_rgb:  # without conversion, channels stay as given
            luma = np.tensordot(_LUMA, array[:3].astype(np.float32), axes=(0, 0))
            array = np.clip(np.round(luma), 0, 255).astype(array.dtype)[None] if array.dtype == np.uint8 else luma[None]
        return array

    def postprocess(self, pixel_values, output_type: str = "pil"):
        """Map model outputs in [-1, 1] back to images.

        Args:
            pixel_values (`torch.Tensor` or `np.ndarray` of shape `(B, C, H, W)` or `(C, H, W)`): values in [-1, 1]
                (clamped).
            output_type (`str`, defaults to `"pil"`): `"pil"` (list of `PIL.Image`), `"np"` (uint8 array
                `(B, H, W, C)`) or `"pt"` (float tensor in [0, 1], `(B, C, H, W)`).
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"`output_type` must be 'pil', 'np' or 'pt', got {output_type!r}.")
        tensor = torch.as_tensor(pixel_values).detach().float().cpu()
        if tensor.ndim == 3:
            tensor = tensor.unsqueeze(0)
        if tensor.ndim != 4 or tensor.shape[1] not in (1, 3):
            raise ValueError(f"Expected pixel values of shape (B, 1 or 3, H, W), got {tuple(tensor.shape)}.")
        unit = ((tensor.clamp(-1, 1) + 1) / 2).nan_to_num(0.5)
        if output_type == "pt":
            return unit
        array = (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return array
        return [Image.fromarray(item[..., 0], mode="L") if item.shape[-1] == 1 else Image.fromarray(item) for item in array]
