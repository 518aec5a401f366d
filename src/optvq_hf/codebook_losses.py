"""The quantization-loss forms of the quantizer family (`OptVQConfig.quantization_loss`).

The original code has three forms (`loss_q_type`), with `z` a row of encoder features, `c` its assigned code,
`sg` stop-gradient and `D` the Euclidean (not squared) distances of each row to every code:

* `"l2"`: `mean((z - sg(c))^2) + beta * mean((sg(z) - c)^2)`: weight 1 on the encoder's commitment term, `beta` on
  the codebook term (here `commitment_weight` is the first weight, 1 by default);
* `"l1"`: the same with absolute values;
* `"ce"`: `cross_entropy(-D, assigned ids)`, averaged over rows, without `beta`: the assigned code must be the most
  likely one under `softmax(-D)`, which moves the features and *every* code (the original's class default, and the
  loss of all its plain-VQ configs).

[`distance_cross_entropy`] computes the `"ce"` form (and OT-VAE's soft-target cross-entropy) block by block with its
own backward, so neither the `N x K` distances nor the softmax are kept for backward.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["QUANTIZATION_LOSSES", "squared_error", "absolute_error", "distance_cross_entropy", "distance_std"]

#: The values of `OptVQConfig.quantization_loss`.
QUANTIZATION_LOSSES = ("l2", "l1", "ce")

_BLOCK_ENTRIES = 1 << 22  # distances per block (16 MiB in float32)


def squared_error(features: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The `"l2"` form of one term: `mean((features - codes)^2)`."""
    return torch.mean((features - codes) ** 2)


def absolute_error(features: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The `"l1"` form of one term: `mean(|features - codes|)`."""
    return torch.mean((features - codes).abs())


def _block_logits(features, codebook, codebook_sq, squared: bool, scale: float):
    """`-scale * ||z - c||^p` of a block of rows and the (clamped) squared distances."""
    distance_sq = (features.pow(2).sum(1, keepdim=True) - 2 * features @ codebook.t() + codebook_sq).clamp_min_(0)
    distance = distance_sq if squared else distance_sq.sqrt()
    return distance.mul(-scale), distance


def _rows_per_block(num_codes: int) -> int:
    return max(1, _BLOCK_ENTRIES // max(num_codes, 1))


@torch.no_grad()
def distance_std(features: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Standard deviation (unbiased, as `torch.std`) of all Euclidean distances between the rows of `features`
    `(N, d)` and `codebook` `(K, d)`, a float32 scalar tensor on their device, computed block by block with float64
    sums (no `N x K` matrix, no host synchronization)."""
    features, codebook = features.detach().float(), codebook.detach().float()
    codebook_sq = codebook.pow(2).sum(1)
    dtype = torch.float32 if features.device.type == "mps" else torch.float64
    sums = features.new_zeros(2, dtype=dtype)
    rows = _rows_per_block(codebook.shape[0])
    for start in range(0, features.shape[0], rows):
        _, distance = _block_logits(features[start:start + rows], codebook, codebook_sq, False, 1.0)
        sums[0] += distance.sum(dtype=dtype)
        sums[1] += distance.square().sum(dtype=dtype)
    count = features.shape[0] * codebook.shape[0]
    variance = (sums[1] - sums[0] * sums[0] / max(count, 1)).clamp_min(0) / max(count - 1, 1)
    return variance.sqrt().float()


class _DistanceCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, codebook, targets, squared, scale):
        codebook_sq = codebook.pow(2).sum(1)
        num_rows = features.shape[0]
        rows = _rows_per_block(codebook.shape[0])
        total = features.new_zeros((), dtype=torch.float32 if features.device.type == "mps" else torch.float64)
        for start in range(0, num_rows, rows):
            stop = min(start + rows, num_rows)
            logits, _ = _block_logits(features[start:stop], codebook, codebook_sq, squared, scale)
            log_norm = torch.logsumexp(logits, dim=1)
            if targets.dtype == torch.long:
                picked = logits.gather(1, targets[start:stop, None]).squeeze(1)
                total += (log_norm - picked).sum(dtype=total.dtype)
            else:
                block_targets = targets[start:stop]
                total += (block_targets.sum(1) * log_norm - (block_targets * logits).sum(1)).sum(dtype=total.dtype)
        ctx.save_for_backward(features, codebook, targets)
        ctx.squared, ctx.scale = squared, scale
        return (total / max(num_rows, 1)).to(features.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        features, codebook, targets = ctx.saved_tensors
        squared, scale = ctx.squared, ctx.scale
        num_rows = features.shape[0]
        codebook_sq = codebook.pow(2).sum(1)
        grad_features = torch.zeros_like(features)
        grad_codebook = torch.zeros_like(codebook)
        code_weights = codebook.new_zeros(codebook.shape[0])
        rows = _rows_per_block(codebook.shape[0])
        factor = grad_output * (-scale / max(num_rows, 1))
        for start in range(0, num_rows, rows):
            stop = min(start + rows, num_rows)
            block = features[start:stop]
            logits, distance = _block_logits(block, codebook, codebook_sq, squared, scale)
            # d loss / d logits = (softmax - targets) / N; d logits / d ||z - c||^p = -scale
            weights = torch.softmax(logits, dim=1)
            if targets.dtype == torch.long:
                weights[torch.arange(stop - start, device=weights.device), targets[start:stop]] -= 1.0
            else:
                block_targets = targets[start:stop]
                weights.mul_(block_targets.sum(1, keepdim=True)).sub_(block_targets)
            weights.mul_(factor)
            # d ||z - c||^2 / dz = 2 (z - c); d ||z - c|| / dz = (z - c) / ||z - c|| (0 at z = c, as torch.cdist)
            if squared:
                weights.mul_(2.0)
            else:
                weights = torch.where(distance > 0, weights / distance.clamp_min(1e-30), torch.zeros_like(weights))
            grad_features[start:stop] = block * weights.sum(1, keepdim=True) - weights @ codebook
            grad_codebook -= weights.t() @ block
            code_weights += weights.sum(0)
        grad_codebook += codebook * code_weights[:, None]
        return grad_features, grad_codebook, None, None, None


def distance_cross_entropy(features: torch.Tensor, codebook: torch.Tensor, targets: torch.Tensor, *,
                           squared: bool = False, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Mean cross-entropy of `softmax(-scale * ||z - c||^p)` over the codes against `targets`, `p = 2 if squared
    else 1`, differentiable in `features` and `codebook`, computed block by block.

    With `targets` the assigned ids and `squared=False`, `scale=1` this is the original code's `"ce"` quantization
    loss, `cross_entropy(-torch.cdist(features, codebook), targets)`; with soft `targets` (rows of a transport
    plan) and `squared=True` it is OT-VAE's loss. Memory: `O(block x K)` in forward and backward (the backward
    recomputes each block's distances) plus, for soft targets, the targets themselves.

    Args:
        features (`torch.Tensor` of shape `(N, d)`): rows (float32).
        codebook (`torch.Tensor` of shape `(K, d)`): codes.
        targets (`torch.LongTensor` of shape `(N,)` or `torch.Tensor` of shape `(N, K)`): code ids, or target
            distributions (no gradient flows to them).
        squared (`bool`, defaults to `False`): logits from squared distances instead of distances.
        scale (`float` or a scalar tensor without gradient, defaults to 1.0): logits are `-scale * distance`.
    """
    if targets.dtype != torch.long:
        targets = targets.detach().to(features.dtype)
    if torch.compiler.is_compiling():  # tensor ops only, so a compiled graph does not break
        distance = torch.cdist(features, codebook)
        logits = -scale * (distance.square() if squared else distance)
        if targets.dtype == torch.long:
            return nn.functional.cross_entropy(logits, targets)
        return -(targets * torch.log_softmax(logits, dim=1)).sum(1).mean()
    return _DistanceCrossEntropy.apply(features, codebook, targets, bool(squared), scale)
