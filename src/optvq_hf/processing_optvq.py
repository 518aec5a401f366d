"""`OptVQProcessor`: images <-> LM token sequences in one object, for language-model data pipelines.

It bundles an [`OptVQImageProcessor`] (resize, crop, scale to [-1, 1]) with an [`OptVQModel`] used as the image
tokenizer and an [`ImageSequenceLayout`] (order, vocabulary offset, begin/end-of-image ids), in the style of
transformers processors:

```python
>>> from optvq_hf import OptVQModel, OptVQProcessor
>>> model = OptVQModel.from_pretrained("path/to/optvq-mnist")
>>> processor = OptVQProcessor.from_model(model, offset=10)       # ids 0..9 left free, e.g. for labels
>>> batch = processor(images=[pil_image_1, pil_image_2], return_tensors="pt")
>>> batch["input_ids"].shape, batch["image_grid_size"]               # (2, L), tensor([[8, 8], [8, 8]])
>>> images = processor.batch_decode(batch["input_ids"], grid_size=batch["image_grid_size"])  # list of PIL images

>>> # datasets: tokenize a whole image dataset into LM sequences
>>> dataset = dataset.map(processor.map_fn("image"), batched=True, batch_size=256, remove_columns=["image"])
```
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_optvq import OptVQImageProcessor
from .sequence import ImageSequenceLayout

__all__ = ["OptVQProcessor"]


class OptVQProcessor(ProcessorMixin):
    r"""
    Turns images into OptVQ token sequences for causal language models, and sequences back into images.

    The layout fields (`offset`, `boi_token_id`, `eoi_token_id`, `head_vocabulary`, `factorized`, `codebook_size`,
    `num_heads`) are saved in `processor_config.json` by `save_pretrained`, together with the image processor; the
    model weights are not (save the model itself, or use the same folder for both: `from_pretrained` loads the model
    from the folder when it holds one).

    Args:
        image_processor ([`OptVQImageProcessor`]): prepares `pixel_values` in [-1, 1].
        model ([`OptVQModel`], *optional*): the image tokenizer. Without it the processor only preprocesses images
            and converts between token grids and sequences; encoding images to sequences and decoding need it.
        offset (`int`, defaults to 0): id of code 0 in the LM vocabulary.
        boi_token_id (`int`, *optional*): begin-of-image id prepended to each sequence.
        eoi_token_id (`int`, *optional*): end-of-image id appended to each sequence.
        head_vocabulary (`str`, defaults to `"shared"`): `"shared"` or `"per_head"` (see [`ImageSequenceLayout`]).
        factorized (`bool`, defaults to `False`): return `(B, h * w, num_heads)` rows instead of flat sequences.
        codebook_size (`int`, *optional*): read from `model.config` when a model is given (must agree).
        num_heads (`int`, *optional*): read from `model.config` when a model is given (must agree).
        encode_batch_size (`int`, defaults to 64): images per forward pass of the tokenizer.
    """

    def __init__(
        self,
        image_processor: OptVQImageProcessor | None = None,
        model=None,
        offset: int = 0,
        boi_token_id: int | None = None,
        eoi_token_id: int | None = None,
        head_vocabulary: str = "shared",
        factorized: bool = False,
        codebook_size: int | None = None,
        num_heads: int | None = None,
        encode_batch_size: int = 64,
    ):
        if image_processor is None:
            if model is None:
                raise ValueError("`OptVQProcessor` needs an `image_processor`, or a `model` to derive one from.")
            image_processor = OptVQImageProcessor.from_model_config(model.config)
        super().__init__(image_processor)
        if model is not None:
            for name, value in (("codebook_size", codebook_size), ("num_heads", num_heads)):
                if value is not None and value != getattr(model.config, name):
                    raise ValueError(
                        f"`{name}`={value} disagrees with the model's config ({name}={getattr(model.config, name)})."
                    )
            codebook_size, num_heads = model.config.codebook_size, model.config.num_heads
        if codebook_size is None:
            raise ValueError("`codebook_size` is required when no `model` is given.")
        if not isinstance(encode_batch_size, int) or encode_batch_size < 1:
            raise ValueError(f"`encode_batch_size` must be a positive int, got {encode_batch_size!r}.")
        self._model = model
        self.offset = offset
        self.boi_token_id = boi_token_id
        self.eoi_token_id = eoi_token_id
        self.head_vocabulary = head_vocabulary
        self.factorized = factorized
        self.codebook_size = codebook_size
        self.num_heads = 1 if num_heads is None else num_heads
        self.encode_batch_size = encode_batch_size
        self._layout = ImageSequenceLayout(
            codebook_size=codebook_size, num_heads=self.num_heads, offset=offset, boi_token_id=boi_token_id,
            eoi_token_id=eoi_token_id, head_vocabulary=head_vocabulary, factorized=factorized,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Construction, saving, loading
    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model, image_processor: OptVQImageProcessor | None = None, **kwargs) -> "OptVQProcessor":
        """A processor for `model`: its image processor follows `model.config` (resolution, channels).

        Args:
            model ([`OptVQModel`]): the image tokenizer.
            image_processor ([`OptVQImageProcessor`], *optional*): defaults to
                `OptVQImageProcessor.from_model_config(model.config)`.
            kwargs: layout fields (`offset`, `boi_token_id`, ...) and `encode_batch_size`.
        """
        return cls(image_processor=image_processor, model=model, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, model=None, load_model: bool = True, **kwargs):
        """Load a processor saved by `save_pretrained`; also loads the [`OptVQModel`] when the folder holds one.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): folder (or Hub id) with `processor_config.json`.
            model ([`OptVQModel`], *optional*): the tokenizer to attach instead of loading one.
            load_model (`bool`, defaults to `True`): load the model from the folder when its `config.json` is an
                OptVQ config.
            kwargs: overrides of saved fields (`offset`, ...) and the usual loading arguments.
        """
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        config_file = os.path.join(str(pretrained_model_name_or_path), "config.json")
        if model is None and load_model and os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as handle:
                model_type = json.load(handle).get("model_type")
            if model_type == "optvq":  # a folder may also hold another model's config (e.g. the LM's)
                from .modeling_optvq import OptVQModel

                model = OptVQModel.from_pretrained(pretrained_model_name_or_path).eval()
        if model is not None:
            processor.model = model
        return processor

    def to_dict(self):
        # The model and the derived layout are not serialized (the layout is rebuilt from the saved fields).
        hidden = {key: self.__dict__.pop(key) for key in ("_model", "_layout") if key in self.__dict__}
        try:
            output = super().to_dict()
        finally:
            self.__dict__.update(hidden)
        output.pop("model", None)
        return output

    @property
    def model(self):
        """The [`OptVQModel`] used as tokenizer (or `None`)."""
        return self._model

    @model.setter
    def model(self, model):
        if model is not None and (model.config.codebook_size, model.config.num_heads) != (
            self.codebook_size, self.num_heads
        ):
            raise ValueError(
                f"The model (codebook_size={model.config.codebook_size}, num_heads={model.config.num_heads}) does not "
                f"match this processor (codebook_size={self.codebook_size}, num_heads={self.num_heads})."
            )
        self._model = model

    @property
    def layout(self) -> ImageSequenceLayout:
        """The [`ImageSequenceLayout`] this processor writes and reads."""
        return self._layout

    @property
    def vocab_size(self) -> int:
        """Smallest LM vocabulary that holds every id this processor emits."""
        return self._layout.vocab_size

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "image_grid_size"]

    def _require_model(self, what: str):
        if self._model is None:
            raise ValueError(f"{what} needs an OptVQModel: pass `model=` or set `processor.model`.")
        return self._model

    # ------------------------------------------------------------------------------------------------------------
    # Images -> sequences
    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images=None, pixel_values: torch.Tensor | None = None, **images_kwargs) -> torch.Tensor:
        """Token ids `(B, num_heads, h, w)` of `images` (anything the image processor accepts) or of ready
        `pixel_values` `(B, C, H, W)` in [-1, 1]. Runs the model in eval mode, `encode_batch_size` images at a time."""
        model = self._require_model("Encoding images")
        if (images is None) == (pixel_values is None):
            raise ValueError("Pass exactly one of `images` and `pixel_values`.")
        if pixel_values is None:
            pixel_values = self.image_processor(images, return_tensors="pt", **images_kwargs)["pixel_values"]
        if not isinstance(pixel_values, torch.Tensor):
            pixel_values = torch.as_tensor(np.asarray(pixel_values))
        was_training = model.training
        model.eval()
        try:
            chunks = [
                model.encode(chunk.to(model.device, torch.float32)).token_ids
                for chunk in pixel_values.split(self.encode_batch_size)
            ]
        finally:
            model.train(was_training)
        return torch.cat(chunks) if chunks else torch.zeros(0, self.num_heads, 0, 0, dtype=torch.long)

    def __call__(self, images=None, pixel_values: torch.Tensor | None = None, return_tensors: str | None = None,
                 return_pixel_values: bool = False, **images_kwargs) -> BatchFeature:
        """Encode images into LM sequences.

        Args:
            images (`PIL.Image`, `np.ndarray`, `torch.Tensor` or a list of them): images to tokenize.
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`, *optional*): already preprocessed images in
                [-1, 1], instead of `images`.
            return_tensors (`str`, *optional*): `"pt"`, `"np"`, or `None` for Python lists (what `datasets.map`
                stores most compactly).
            return_pixel_values (`bool`, defaults to `False`): also return the preprocessed `pixel_values`.
            images_kwargs: passed to the image processor (e.g. `size`, `crop_size`).

        Returns:
            [`BatchFeature`] with `input_ids` `(B, L)` (or `(B, h * w, num_heads)` when factorized),
            `attention_mask` (ones, same shape as `input_ids` for flat sequences, `(B, h * w)` when factorized),
            `image_grid_size` `(B, 2)` (the `(h, w)` needed to decode), and optionally `pixel_values`.
        """
        if images is None and pixel_values is None:
            raise ValueError("Pass `images` (or `pixel_values`) to the processor.")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"`return_tensors` must be 'pt', 'np' or None, got {return_tensors!r}.")
        if pixel_values is None:
            pixel_values = self.image_processor(images, return_tensors="pt", **images_kwargs)["pixel_values"]
        token_ids = self.encode_images(pixel_values=pixel_values)
        input_ids = self._layout.tokens_to_sequence(token_ids).cpu()
        grid = torch.tensor([list(token_ids.shape[-2:])], dtype=torch.long).repeat(token_ids.shape[0], 1)
        data = {
            "input_ids": input_ids,
            "attention_mask": torch.ones(input_ids.shape[:2], dtype=torch.long),
            "image_grid_size": grid,
        }
        if return_pixel_values:
            data["pixel_values"] = torch.as_tensor(pixel_values).float().cpu()
        if return_tensors is None:
            data = {key: value.tolist() for key, value in data.items()}
        elif return_tensors == "np":
            data = {key: value.numpy() for key, value in data.items()}
        return BatchFeature(data=data)

    def map_fn(self, image_column: str = "image", **images_kwargs):
        """A function for `datasets.Dataset.map(..., batched=True)`: reads `batch[image_column]`, returns
        `input_ids`, `attention_mask` and `image_grid_size` as lists (other columns are kept by `datasets`).

        Args:
            image_column (`str`, defaults to `"image"`): the column holding the images.
            images_kwargs: passed to the image processor.
        """

        def tokenize(batch):
            if image_column not in batch:
                raise ValueError(f"Column {image_column!r} not found; columns are {sorted(batch)}.")
            return dict(self(images=list(batch[image_column]), return_tensors=None, **images_kwargs))

        return tokenize

    # ------------------------------------------------------------------------------------------------------------
    # Sequences -> token grids -> images
    # ------------------------------------------------------------------------------------------------------------
    def tokens_to_sequence(self, token_ids: torch.Tensor) -> torch.LongTensor:
        """Token ids `(B, num_heads, h, w)` -> sequences, with this processor's layout."""
        return self._layout.tokens_to_sequence(token_ids)

    def sequence_to_tokens(self, input_ids, grid_size) -> torch.LongTensor:
        """Sequences -> token ids `(B, num_heads, h, w)`; `grid_size` is `(h, w)` or the `image_grid_size` column."""
        return self._layout.sequence_to_tokens(input_ids, grid_size)

    @torch.no_grad()
    def decode(self, input_ids, grid_size, output_type: str = "pil"):
        """Decode sequences to images.

        Args:
            input_ids (`torch.LongTensor`, array or list): `(B, L)` sequences (or `(L,)` for one image), exactly as
                this processor produces them (begin/end ids included when configured).
            grid_size (`tuple[int, int]` or `(B, 2)`): the latent grid, e.g. the `image_grid_size` output.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (uint8 `(B, H, W, C)`) or `"pt"` (float in
                [0, 1], `(B, C, H, W)`); see [`OptVQImageProcessor.postprocess`].
        """
        model = self._require_model("Decoding sequences")
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.as_tensor(np.asarray(input_ids))
        single = input_ids.ndim == (2 if self.factorized else 1)
        if single:
            input_ids = input_ids.unsqueeze(0)
        token_ids = self._layout.sequence_to_tokens(input_ids, grid_size).to(model.device)
        pixels = model.decode_tokens(token_ids)
        images = self.image_processor.postprocess(pixels, output_type=output_type)
        return images[0] if single and output_type == "pil" else images

    def batch_decode(self, input_ids, grid_size, output_type: str = "pil"):
        """Decode a batch of sequences `(B, L)` to images (a list of PIL images by default); see `decode`."""
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.as_tensor(np.asarray(input_ids))
        if input_ids.ndim != (3 if self.factorized else 2):
            raise ValueError(f"`batch_decode` expects a batch of sequences, got shape {tuple(input_ids.shape)}.")
        return self.decode(input_ids, grid_size, output_type=output_type)
