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

import torch

__all__ = ["is_integer_tensor", "check_finite", "check_token_ids"]


def is_integer_tensor(tensor) -> bool:
    """Whether `tensor` is a tensor of integers (not floating point, complex or bool)."""
    return isinstance(tensor, torch.Tensor) and not (
        tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool
    )


def check_finite(tensor: torch.Tensor, name: str, training: bool = False):
    """Raise a `ValueError` if `tensor` holds NaN or Inf, unless checking would synchronize an accelerator's
    training step (see the module docstring) or `torch.compile` is tracing."""
    if torch.compiler.is_compiling() or (training and tensor.device.type != "cpu"):
        return
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contain NaN or Inf values.")


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
