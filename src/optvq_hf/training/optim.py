"""AdamW parameter groups and learning-rate schedules of the original OptVQ recipe."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["split_weight_decay", "build_param_groups", "build_optimizer", "build_scheduler", "SCHEDULERS"]

# Module types whose `weight` is decayed; every other parameter (biases, norm scales, codebook table) is not.
_DECAYED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.MultiheadAttention)
SCHEDULERS = ("onecycle", "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
              "polynomial")


def split_weight_decay(modules: Iterable[nn.Module]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split the trainable parameters of `modules` into (decayed, not decayed).

    Decayed: the `weight` of linear, convolution and attention modules. Not decayed: biases, normalization
    parameters, embeddings (the codebook table). Each parameter appears once even if modules share it.
    """
    decayed_ids: set[int] = set()
    modules = list(modules)
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, _DECAYED_TYPES):
                for name, param in sub.named_parameters(recurse=False):
                    if "weight" in name:
                        decayed_ids.add(id(param))
    decayed, not_decayed, seen = [], [], set()
    for module in modules:
        for param in module.parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (decayed if id(param) in decayed_ids else not_decayed).append(param)
    return decayed, not_decayed


def build_param_groups(model: nn.Module, learning_rate: float, weight_decay: float = 0.05,
                       codebook_lr_multiplier: float = 1.0) -> list[dict]:
    """The four AdamW groups of the original recipe for an [`OptVQModel`].

    Backbone (encoder, decoder, quant convs) with and without weight decay at `learning_rate`, then the quantizer
    (codebook projection decayed, table not) at `learning_rate * codebook_lr_multiplier`. Empty groups are dropped.

    Args:
        model (`OptVQModel`): the model (not wrapped).
        learning_rate (`float`): the learning rate of the backbone (already scaled by the batch size if wanted).
        weight_decay (`float`, defaults to 0.05): decay of weights.
        codebook_lr_multiplier (`float`, defaults to 1.0): learning-rate factor of the quantizer's parameters.
    """
    if learning_rate <= 0:
        raise ValueError(f"`learning_rate` must be positive, got {learning_rate}.")
    quantizer = model.quantizer
    quantizer_ids = {id(p) for p in quantizer.parameters()}
    backbone = [module for name, module in model.named_children() if name != "quantizer"]
    decayed, not_decayed = split_weight_decay(backbone)
    decayed = [p for p in decayed if id(p) not in quantizer_ids]
    not_decayed = [p for p in not_decayed if id(p) not in quantizer_ids]
    q_decayed, q_not_decayed = split_weight_decay([quantizer])
    codebook_lr = learning_rate * codebook_lr_multiplier
    groups = [
        {"params": decayed, "lr": learning_rate, "weight_decay": weight_decay, "name": "backbone_decay"},
        {"params": not_decayed, "lr": learning_rate, "weight_decay": 0.0, "name": "backbone_no_decay"},
        {"params": q_decayed, "lr": codebook_lr, "weight_decay": weight_decay, "name": "quantizer_decay"},
        {"params": q_not_decayed, "lr": codebook_lr, "weight_decay": 0.0, "name": "quantizer_no_decay"},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(param_groups: list[dict], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-7,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups` with the original betas (0.9, 0.999) and eps 1e-7."""
    kwargs = {}
    if fused is not None:
        kwargs["fused"] = fused
    return torch.optim.AdamW(param_groups, betas=betas, eps=eps, **kwargs)


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int | None = None,
                    warmup_ratio: float = 0.01):
    """A learning-rate schedule stepped once per optimizer step.

    Args:
        name (`str`): `"onecycle"` (the original recipe: `OneCycleLR` with PyTorch's defaults, cosine annealing,
            peak at each group's `lr`, beta1 cycled between 0.95 and 0.85)
            or a transformers schedule name (`"constant"`, `"constant_with_warmup"`, `"linear"`, `"cosine"`,
            `"cosine_with_restarts"`, `"polynomial"`).
        optimizer (`torch.optim.Optimizer`): the optimizer; its groups' `lr` are the peak rates.
        total_steps (`int`): number of optimizer steps of the whole run.
        warmup_steps (`int`, *optional*): warm-up steps; defaults to `warmup_ratio * total_steps`.
        warmup_ratio (`float`, defaults to 0.01): fraction of warm-up when `warmup_steps` is not given (OneCycle's
            `pct_start`).
    """
    if name not in SCHEDULERS:
        raise ValueError(f"`lr_scheduler` must be one of {SCHEDULERS}, got {name!r}.")
    if total_steps < 1:
        raise ValueError(f"`total_steps` must be >= 1, got {total_steps}.")
    if name == "onecycle":
        pct_start = warmup_ratio if warmup_steps is None else warmup_steps / total_steps
        pct_start = min(max(pct_start, 1e-6), 0.999)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=total_steps + 1,  # OneCycleLR raises when stepped past total_steps; we step after the last.
            pct_start=pct_start,
            anneal_strategy="cos",
            # As the original: OneCycleLR's defaults, which also cycle AdamW's beta1 between 0.95 and 0.85.
        )
    from transformers import get_scheduler

    warmup = int(round(warmup_ratio * total_steps)) if warmup_steps is None else int(warmup_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
