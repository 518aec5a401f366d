"""OptVQ token grids <-> flat token sequences for autoregressive (language) models.

An [`OptVQModel`] turns an image into a grid of token ids `(B, num_heads, h, w)`: every latent position carries one
code per head. A causal language model wants a flat sequence `(B, L)`. [`ImageSequenceLayout`] fixes the order and
the vocabulary of that sequence, both ways, exactly:

* **Order**: raster order over the grid (row by row, left to right), and inside a position its `num_heads` tokens
  head 0 first (*heads innermost*). Flat index of head `k` at row `i`, column `j`: `(i * w + j) * num_heads + k`.
  This is the order in which the quantizer itself flattens features, so the heads of one position are adjacent and a
  causal LM predicts them in turn (head `k` sees heads `< k` of its own position and every earlier position).
* **Vocabulary**: image token id = `offset + code` (`head_vocabulary="shared"`, the default: all heads share the
  codebook, as they do in the quantizer) or `offset + k * codebook_size + code` (`head_vocabulary="per_head"`: each
  head has its own id range, so the LM always knows which head it is predicting and sampling can be restricted to
  the right range). `offset` lets image tokens live after a text model's vocabulary.
* **Begin/end of image**: optional `boi_token_id` / `eoi_token_id` wrap every image's tokens. They must lie outside
  the image id range.
* **Factorized layout** (`factorized=True`): one sequence position per grid position, shaped `(B, h * w, num_heads)`;
  a model reads the `num_heads` tokens of a position together and predicts the next position's heads in turn
  (head 0, then head 1 given head 0, ...). This shortens the sequence `num_heads` times.

The grid size is not stored in the sequence; it is returned alongside it (`grid_size`, e.g. by
[`OptVQProcessor`]) and passed back to [`ImageSequenceLayout.sequence_to_tokens`], which checks that the length
matches, so decoding never guesses a shape.

Example:

```python
>>> import torch
>>> from optvq_hf.sequence import ImageSequenceLayout
>>> layout = ImageSequenceLayout(codebook_size=1024, num_heads=2, offset=10, boi_token_id=0, eoi_token_id=1)
>>> token_ids = torch.randint(0, 1024, (3, 2, 4, 4))
>>> sequence = layout.tokens_to_sequence(token_ids)
>>> sequence.shape  # 1 + 4 * 4 * 2 + 1
torch.Size([3, 34])
>>> torch.equal(layout.sequence_to_tokens(sequence, grid_size=(4, 4)), token_ids)
True
```
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .validation import check_token_ids

__all__ = ["HEAD_VOCABULARIES", "ImageSequenceLayout", "tokens_to_sequence", "sequence_to_tokens", "normalize_grid_size"]

HEAD_VOCABULARIES = ("shared", "per_head")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def normalize_grid_size(grid_size) -> tuple[int, int]:
    """`grid_size` as a `(h, w)` tuple of positive ints.

    Args:
        grid_size: `(h, w)` as a tuple/list, or a tensor/array of shape `(2,)`, or a batch of them `(B, 2)` whose rows
            are all equal (what [`OptVQProcessor`] returns as `image_grid_size`).
    """
    if isinstance(grid_size, (torch.Tensor, np.ndarray)) or (
        isinstance(grid_size, (list, tuple)) and grid_size and isinstance(grid_size[0], (list, tuple, torch.Tensor,
                                                                                       np.ndarray))
    ):
        array = np.asarray(grid_size.cpu() if isinstance(grid_size, torch.Tensor) else grid_size)
        if array.ndim == 2 and array.shape[1] == 2 and array.shape[0] >= 1:
            if not (array == array[0]).all():
                raise ValueError(
                    f"All images of a batch must share one grid size to form a (B, L) batch, got sizes "
                    f"{sorted({tuple(int(v) for v in row) for row in array})}."
                )
            array = array[0]
        if array.shape != (2,):
            raise ValueError(f"`grid_size` must be (h, w) or a batch (B, 2) of equal rows, got shape {array.shape}.")
        grid_size = tuple(array.tolist())
    if not isinstance(grid_size, (list, tuple)) or len(grid_size) != 2 or not all(_is_int(v) for v in grid_size):
        raise ValueError(f"`grid_size` must be a pair of ints (h, w), got {grid_size!r}.")
    height, width = int(grid_size[0]), int(grid_size[1])
    if height < 1 or width < 1:
        raise ValueError(f"`grid_size` must be positive, got {(height, width)}.")
    return height, width


@dataclass(frozen=True)
class ImageSequenceLayout:
    r"""How OptVQ token grids map to LM token sequences (see the module docstring for the exact order).

    Args:
        codebook_size (`int`): number of codes of the tokenizer (`config.codebook_size`).
        num_heads (`int`, defaults to 1): tokens per latent position (`config.num_heads`).
        offset (`int`, defaults to 0): id of code 0 in the LM vocabulary (e.g. the text vocabulary size).
        boi_token_id (`int`, *optional*): begin-of-image id prepended to every image (flat layout only).
        eoi_token_id (`int`, *optional*): end-of-image id appended to every image (flat layout only).
        head_vocabulary (`str`, defaults to `"shared"`): `"shared"` (id = `offset + code`) or `"per_head"`
            (id = `offset + head * codebook_size + code`).
        factorized (`bool`, defaults to `False`): sequences of shape `(B, h * w, num_heads)`, one position per grid
            position, instead of flat `(B, h * w * num_heads)`.
    """

    codebook_size: int
    num_heads: int = 1
    offset: int = 0
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    head_vocabulary: str = "shared"
    factorized: bool = False

    def __post_init__(self):
        for name in ("codebook_size", "num_heads"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if not _is_int(self.offset) or self.offset < 0:
            raise ValueError(f"`offset` must be an int >= 0, got {self.offset!r}.")
        if self.head_vocabulary not in HEAD_VOCABULARIES:
            raise ValueError(f"`head_vocabulary` must be one of {HEAD_VOCABULARIES}, got {self.head_vocabulary!r}.")
        if not isinstance(self.factorized, bool):
            raise ValueError(f"`factorized` must be a bool, got {self.factorized!r}.")
        low, high = self.image_token_range()
        for name in ("boi_token_id", "eoi_token_id"):
            value = getattr(self, name)
            if value is None:
                continue
            if self.factorized:
                raise ValueError(
                    f"`{name}` is not supported with `factorized=True`: a factorized sequence has one row of "
                    f"num_heads tokens per grid position; add begin/end markers in the model instead."
                )
            if not _is_int(value) or value < 0:
                raise ValueError(f"`{name}` must be an int >= 0, got {value!r}.")
            if low <= value < high:
                raise ValueError(
                    f"`{name}` ({value}) lies inside the image token range [{low}, {high}) (offset={self.offset}, "
                    f"{self.image_vocab_size} image ids); choose an id outside it."
                )
        if self.boi_token_id is not None and self.boi_token_id == self.eoi_token_id:
            raise ValueError(f"`boi_token_id` and `eoi_token_id` must differ, both are {self.boi_token_id}.")

    # ------------------------------------------------------------------------------------------------------------
    # Sizes and ranges
    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config, **kwargs) -> "ImageSequenceLayout":
        """The layout for an [`OptVQConfig`] (its `codebook_size` and `num_heads`); `kwargs` set the other fields."""
        return cls(codebook_size=config.codebook_size, num_heads=config.num_heads, **kwargs)

    @property
    def image_vocab_size(self) -> int:
        """Number of distinct image token ids: `codebook_size`, times `num_heads` for `"per_head"`."""
        return self.codebook_size * (self.num_heads if self.head_vocabulary == "per_head" else 1)

    @property
    def vocab_size(self) -> int:
        """Smallest LM vocabulary holding every id this layout emits (ids below `offset` are the caller's)."""
        ids = [self.offset + self.image_vocab_size]
        ids += [special + 1 for special in (self.boi_token_id, self.eoi_token_id) if special is not None]
        return max(ids)

    @property
    def num_special_tokens(self) -> int:
        """How many of `boi_token_id` / `eoi_token_id` are set (0, 1 or 2)."""
        return int(self.boi_token_id is not None) + int(self.eoi_token_id is not None)

    def image_token_range(self, head: int | None = None) -> tuple[int, int]:
        """Half-open id range `[low, high)` of image tokens (of one head's tokens when `head` is given)."""
        if head is None:
            return self.offset, self.offset + self.image_vocab_size
        if not _is_int(head) or not 0 <= head < self.num_heads:
            raise ValueError(f"`head` must be in [0, {self.num_heads - 1}], got {head!r}.")
        if self.head_vocabulary == "shared":
            return self.offset, self.offset + self.codebook_size
        low = self.offset + head * self.codebook_size
        return low, low + self.codebook_size

    def sequence_length(self, grid_size) -> int:
        """Length `L` of the sequence of one image with latent grid `grid_size` `(h, w)` (specials included)."""
        height, width = normalize_grid_size(grid_size)
        if self.factorized:
            return height * width
        return height * width * self.num_heads + self.num_special_tokens

    def head_of_position(self, grid_size) -> torch.LongTensor:
        """`(L,)` head index of every flat sequence position (`-1` at begin/end-of-image); flat layout only."""
        if self.factorized:
            raise ValueError("`head_of_position` describes the flat layout; a factorized row holds heads 0..H-1.")
        height, width = normalize_grid_size(grid_size)
        heads = torch.arange(self.num_heads).repeat(height * width)
        parts = [torch.full((1,), -1)] if self.boi_token_id is not None else []
        parts.append(heads)
        if self.eoi_token_id is not None:
            parts.append(torch.full((1,), -1))
        return torch.cat(parts).long()

    # ------------------------------------------------------------------------------------------------------------
    # Conversions
    # ------------------------------------------------------------------------------------------------------------
    def _check_token_ids(self, token_ids) -> torch.Tensor:
        check_token_ids(token_ids, None, "`token_ids`")
        if token_ids.ndim == 3 and self.num_heads == 1:
            token_ids = token_ids.unsqueeze(1)
        if token_ids.ndim != 4 or token_ids.shape[1] != self.num_heads:
            raise ValueError(
                f"`token_ids` must have shape (B, num_heads={self.num_heads}, h, w)"
                + (" or (B, h, w)" if self.num_heads == 1 else "")
                + f", got {tuple(token_ids.shape)}."
            )
        return check_token_ids(token_ids, self.codebook_size, "`token_ids`").long()

    def _head_shift(self, device) -> torch.Tensor:
        if self.head_vocabulary == "per_head":
            return torch.arange(self.num_heads, device=device) * self.codebook_size
        return torch.zeros(self.num_heads, dtype=torch.long, device=device)

    def tokens_to_sequence(self, token_ids: torch.Tensor) -> torch.LongTensor:
        """Flatten token grids into LM sequences.

        Args:
            token_ids (`torch.LongTensor` of shape `(B, num_heads, h, w)`, or `(B, h, w)` when `num_heads == 1`):
                codes in `[0, codebook_size)`, as [`OptVQModel.encode`] returns them.

        Returns:
            `torch.LongTensor`: `(B, L)` with `L = [1] + h * w * num_heads + [1]` (flat layout), or
            `(B, h * w, num_heads)` (factorized layout), on the input's device.
        """
        token_ids = self._check_token_ids(token_ids)
        batch, heads, height, width = token_ids.shape
        grouped = token_ids.permute(0, 2, 3, 1).reshape(batch, height * width, heads)  # raster order, heads inner
        grouped = grouped + self._head_shift(token_ids.device) + self.offset
        if self.factorized:
            return grouped.contiguous()
        parts = []
        if self.boi_token_id is not None:
            parts.append(grouped.new_full((batch, 1), self.boi_token_id))
        parts.append(grouped.reshape(batch, height * width * heads))
        if self.eoi_token_id is not None:
            parts.append(grouped.new_full((batch, 1), self.eoi_token_id))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0].contiguous()

    def sequence_to_tokens(self, sequence, grid_size) -> torch.LongTensor:
        """Inverse of [`~ImageSequenceLayout.tokens_to_sequence`]; exact.

        Args:
            sequence (`torch.LongTensor`, list or array): `(B, L)` (flat layout; begin/end ids included when the
                layout has them) or `(B, h * w, num_heads)` (factorized layout).
            grid_size (`tuple[int, int]` or `(B, 2)` tensor/array of equal rows): the latent grid `(h, w)` the
                sequence came from.

        Returns:
            `torch.LongTensor` of shape `(B, num_heads, h, w)`: codes in `[0, codebook_size)`.
        """
        height, width = normalize_grid_size(grid_size)
        if not isinstance(sequence, torch.Tensor):
            try:
                sequence = torch.as_tensor(np.asarray(sequence))
            except (TypeError, ValueError) as error:
                raise ValueError(f"`sequence` must be a tensor or a rectangular array of ints: {error}") from error
        if sequence.dtype.is_floating_point or sequence.dtype == torch.bool or sequence.is_complex():
            raise ValueError(f"`sequence` must hold integer ids, got dtype {sequence.dtype}.")
        sequence = sequence.long()
        num_positions = height * width
        if self.factorized:
            expected = (num_positions, self.num_heads)
            if sequence.ndim != 3 or tuple(sequence.shape[1:]) != expected:
                raise ValueError(
                    f"A factorized sequence for grid {(height, width)} must have shape (B, {expected[0]}, "
                    f"{expected[1]}), got {tuple(sequence.shape)}."
                )
            grouped = sequence
        else:
            length = self.sequence_length((height, width))
            if sequence.ndim != 2 or sequence.shape[1] != length:
                raise ValueError(
                    f"A sequence for grid {(height, width)} with num_heads={self.num_heads} and "
                    f"{self.num_special_tokens} begin/end ids must have shape (B, {length}), got "
                    f"{tuple(sequence.shape)}."
                )
            start, stop = 0, length
            if self.boi_token_id is not None:
                if sequence.shape[0] and not bool((sequence[:, 0] == self.boi_token_id).all()):
                    raise ValueError(
                        f"Every sequence must start with boi_token_id={self.boi_token_id}, got first ids "
                        f"{sorted(set(sequence[:, 0].tolist()))}."
                    )
                start = 1
            if self.eoi_token_id is not None:
                if sequence.shape[0] and not bool((sequence[:, -1] == self.eoi_token_id).all()):
                    raise ValueError(
                        f"Every sequence must end with eoi_token_id={self.eoi_token_id}, got last ids "
                        f"{sorted(set(sequence[:, -1].tolist()))}."
                    )
                stop = length - 1
            grouped = sequence[:, start:stop].reshape(sequence.shape[0], num_positions, self.num_heads)
        codes = grouped - self.offset - self._head_shift(grouped.device)
        if codes.numel():
            bad = (codes < 0) | (codes >= self.codebook_size)
            if bool(bad.any()):
                head = int(bad.nonzero()[0, -1])
                low, high = self.image_token_range(head)
                wrong = int(grouped[bad][0])
                raise ValueError(
                    f"Image token ids of head {head} must lie in [{low}, {high}) (offset={self.offset}, "
                    f"codebook_size={self.codebook_size}, head_vocabulary={self.head_vocabulary!r}), got id {wrong} "
                    f"({int(bad.sum())} ids out of range)."
                )
        batch = grouped.shape[0]
        return codes.reshape(batch, height, width, self.num_heads).permute(0, 3, 1, 2).contiguous()


def tokens_to_sequence(token_ids: torch.Tensor, codebook_size: int, offset: int = 0, **layout_kwargs) -> torch.LongTensor:
    """Functional form of [`ImageSequenceLayout.tokens_to_sequence`].

    Args:
        token_ids (`torch.LongTensor` of shape `(B, num_heads, h, w)`): codes; `num_heads` is read from the shape.
        codebook_size (`int`): number of codes.
        offset (`int`, defaults to 0): id of code 0 in the LM vocabulary.
        layout_kwargs: other [`ImageSequenceLayout`] fields (`boi_token_id`, `eoi_token_id`, `head_vocabulary`,
            `factorized`).
    """
    if not isinstance(token_ids, torch.Tensor) or token_ids.ndim not in (3, 4):
        shape = tuple(token_ids.shape) if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
        raise ValueError(f"`token_ids` must be a (B, num_heads, h, w) or (B, h, w) tensor, got {shape}.")
    num_heads = token_ids.shape[1] if token_ids.ndim == 4 else 1
    layout = ImageSequenceLayout(codebook_size=codebook_size, num_heads=num_heads, offset=offset, **layout_kwargs)
    return layout.tokens_to_sequence(token_ids)


def sequence_to_tokens(sequence, grid_size, codebook_size: int, num_heads: int = 1, offset: int = 0,
                       **layout_kwargs) -> torch.LongTensor:
    """Functional form of [`ImageSequenceLayout.sequence_to_tokens`].

    Args:
        sequence (`torch.LongTensor`): `(B, L)` (or `(B, h * w, num_heads)` with `factorized=True`).
        grid_size (`tuple[int, int]`): the latent grid `(h, w)`.
        codebook_size (`int`): number of codes.
        num_heads (`int`, defaults to 1): tokens per position.
        offset (`int`, defaults to 0): id of code 0 in the LM vocabulary.
        layout_kwargs: other [`ImageSequenceLayout`] fields.
    """
    layout = ImageSequenceLayout(codebook_size=codebook_size, num_heads=num_heads, offset=offset, **layout_kwargs)
    return layout.sequence_to_tokens(sequence, grid_size)
