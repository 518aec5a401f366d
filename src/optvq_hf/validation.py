"""Input checks shared by every public entry point (models, quantizers, sequence layouts, metrics).

Checks run once, at the public boundary: `OptVQModel.encode` / `forward` / `decode` / `decode_tokens`, the diffusers
`OptVQVQModel` methods, and a quantizer called on its own. Inside a model the quantizer does not check again.

Non-finite values: a full-tensor `isfinite` is a host synchronization on an accelerator. It is therefore checked
where it is free or where a synchronization does not matter: always on CPU, and on accelerators in eval mode
(inference, evaluation). A module in training mode on an accelerator skips it, so a training step adds no
synchronization; a non-finite input then shows up as a non-finite loss. Nothing is checked while `torch.compile`
traces (the check would break the graph).
"""

from __future__ import annotations

import contextlib
import math

import torch

__all__ = ["MAX_FEATURE_MAGNITUDE", "is_integer_tensor", "check_finite", "check_token_ids", "check_weights_fit",
           "weights_file_errors_named"]


def is_integer_tensor(tensor) -> bool:
    """Whether `tensor` is a tensor of integers (not floating point, complex or bool)."""
    return isinstance(tensor, torch.Tensor) and not (
        tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool
    )


#: Largest feature magnitude a quantizer accepts: its float32 loss sums squared differences (up to (2 * 1e15)^2 =
#: 4e30 each) over at most ~1e8 entries without overflowing (float32's largest value is 3.4e38).
MAX_FEATURE_MAGNITUDE = 1e15


def check_finite(tensor: torch.Tensor, name: str, training: bool = False, max_magnitude: float | None = None,
                 hint=""):
    """Raise a `ValueError` if `tensor` holds NaN or Inf (or, with `max_magnitude`, a value beyond it), unless checking
    would synchronize an accelerator's training step (see the module docstring) or `torch.compile` is tracing.

    The message is `"{name} contain ..."`, followed by `hint` (a string, or a function giving one, called only on
    failure)."""
    if torch.compiler.is_compiling() or (training and tensor.device.type != "cpu"):
        return
    if callable(hint):
        try:
            check_finite(tensor, name, training, max_magnitude)
        except ValueError as error:
            raise ValueError(f"{error}{hint()}") from None
        return
    if max_magnitude is None:
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} contain NaN or Inf values.{hint}")
        return
    if bool((tensor.detach().abs() <= max_magnitude).all()):  # one reduction, as `isfinite`; False for NaN too
        return
    largest = float(tensor.detach().abs().amax())
    if math.isnan(largest) or math.isinf(largest):
        raise ValueError(f"{name} contain NaN or Inf values.{hint}")
    if largest > max_magnitude:
        raise ValueError(f"{name} contain values of magnitude {largest:.3g}, beyond {max_magnitude:.0e}: the "
                         f"quantizer's float32 loss would overflow.{hint}")


def check_token_ids(token_ids, codebook_size: int | None, name: str = "Token ids") -> torch.Tensor:
    """Raise a `ValueError` unless `token_ids` is an integer tensor of codes in `[0, codebook_size)`; return it.

    `codebook_size=None` checks the type only. The range is not checked while `torch.compile` traces (reading it
    back would break the graph).
    """
    if not isinstance(token_ids, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(token_ids).__name__}.")
    if not is_integer_tensor(token_ids):
        raise ValueError(f"{name} must be an integer tensor, got dtype {token_ids.dtype}.")
    if codebook_size is not None and token_ids.numel() and not torch.compiler.is_compiling():
        low, high = int(token_ids.min()), int(token_ids.max())
        if low < 0 or high >= codebook_size:
            raise ValueError(
                f"{name} must lie in [0, {codebook_size - 1}] (codebook_size={codebook_size}), got values in "
                f"[{low}, {high}]."
            )
    return token_ids


def check_weights_fit(source: str, missing=(), mismatched=(), unexpected=(), allow_missing: bool = False,
                      allow_mismatched: bool = False):
    """Raise one `ValueError` listing the weights a checkpoint (named by `source`) lacks (`missing`: names) or holds
    with another shape (`mismatched`: `(name, checkpoint shape, model shape)` triples), both shapes given.

    Missing weights are accepted with `allow_missing` (they are then initialized), mismatched shapes with
    `allow_mismatched`. Weights the model does not have (`unexpected`) are listed with the others but are never an
    error on their own (transformers' convention: they are ignored with a warning).
    """
    missing = [] if allow_missing else sorted(missing)
    mismatched = [] if allow_mismatched else [
        f"{name}: checkpoint {tuple(found)} vs model {tuple(expected)}" for name, found, expected in sorted(mismatched)
    ]
    if not (missing or mismatched):
        return
    unexpected = sorted(unexpected)

    def listing(names):
        return f"{names[:10]}{f' ... ({len(names)} in all)' if len(names) > 10 else ''}"

    raise ValueError(
        f"The weights in {source} do not fit the model's config:"
        + (f"\n  missing: {listing(missing)} (pass `initialize_missing_weights=True` to initialize them)"
           if missing else "")
        + (f"\n  shape mismatch: {listing(mismatched)} (pass `ignore_mismatched_sizes=True` to initialize them)"
           if mismatched else "")
        + (f"\n  not in the model: {listing(unexpected)}" if unexpected else "")
    )


@contextlib.contextmanager
def weights_file_errors_named(source: str):
    """Turn a weights file that cannot be read as safetensors (truncated, not safetensors) into a `ValueError` naming
    `source`, instead of safetensors' bare header error."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as error:
        raise ValueError(f"The weights in {source} are not a readable safetensors file: {error}") from error
