"""Exponential moving average of a model's parameters, checkpointable with `accelerate`."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EMAModel"]


class EMAModel:
    """Shadow copy `s <- decay_t * s + (1 - decay_t) * p` of the trainable parameters of a model (buffers copied).

    `decay_t = min(decay, (1 + t) / (10 + t))` after `t` updates (the usual warm-up), or `decay` if
    `use_warmup=False`. Has `state_dict`/`load_state_dict`, so `accelerator.register_for_checkpointing(ema)` saves it.

    Args:
        model (`nn.Module`): the model to track (unwrapped).
        decay (`float`, defaults to 0.999): the final decay.
        use_warmup (`bool`, defaults to `True`): ramp the decay up over the first updates.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, use_warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"`decay` must be in [0, 1), got {decay}.")
        self.decay = float(decay)
        self.use_warmup = bool(use_warmup)
        self.num_updates = 0
        self.shadow = {name: param.detach().clone().float() for name, param in model.named_parameters()
                       if param.requires_grad}

    def current_decay(self) -> float:
        """The decay the next update will use."""
        if not self.use_warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def step(self, model: nn.Module):
        """Move the shadow towards the model's current parameters."""
        decay = self.current_decay()
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module):
        """Write the averaged parameters into `model` (in place)."""
        for name, param in model.named_parameters():
            if name in self.shadow:
                param.copy_(self.shadow[name].to(param.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "use_warmup": self.use_warmup, "num_updates": self.num_updates,
                "shadow": {name: tensor.clone() for name, tensor in self.shadow.items()}}

    def load_state_dict(self, state_dict: dict):
        missing = set(self.shadow) - set(state_dict["shadow"])
        if missing:
            raise ValueError(f"EMA state is missing parameters: {sorted(missing)[:5]}...")
        self.decay = float(state_dict["decay"])
        self.use_warmup = bool(state_dict["use_warmup"])
        self.num_updates = int(state_dict["num_updates"])
        for name, tensor in state_dict["shadow"].items():
            if name in self.shadow:
                self.shadow[name].copy_(tensor)
