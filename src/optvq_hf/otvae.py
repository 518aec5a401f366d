"""OT-VAE quantizer: equipartition optimal-transport targets with Gumbel-softmax decoding.

From "Learning Discrete Representation with Optimal Transport Quantized Autoencoders" (OT-VAE). Instead of
stop-gradient losses, EMA updates or code resets, the assignment of features to codes is regularized by optimal
transport: over a batch, a Sinkhorn plan with uniform code marginals (every code receives the same mass, the
"equipartition" constraint of SeLa / SwAV clustering) gives soft *targets* `q`; the quantizer's own categorical
distribution `p(k | z) = softmax(-||z - c_k||^2)` is trained towards them by cross-entropy, which moves both the
encoder features and the codes (no stop-gradient anywhere). During training the decoder receives a Gumbel-softmax
sample of `p` (`sum_k y_k c_k`), a differentiable stochastic decoding; at inference the token is the most likely
code, i.e. the nearest one, and the decoder receives that code.

How our implementation reads the paper (the summary available to us gives the method, not every constant):

* logits are negative squared Euclidean distances between a head's features and the (projected) codes;
* targets use OptVQ's cost (Euclidean distances normalized over the batch, `normalization`), inverse temperature
  `epsilon` and `num_iters` Sinkhorn rounds, normalized so each row of `q` sums to 1; they carry no gradient. Under
  `torch.distributed` the code marginals are computed over the global batch (all ranks);
* loss = `commitment_weight * mean_i CE(q_i, p_i)`;
* Gumbel-softmax with temperature `gumbel_temperature`, soft (`gumbel_hard=False`) or straight-through hard.

The module shares [`OptVQQuantizer`]'s interface and parameters (codebook table + optional shared projection, heads,
token layout, `embed_tokens`, statistics), so models, checkpoints and tools treat the whole family alike.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .quantization import OptVQQuantizer
from .sinkhorn import VALID_NORMALIZATIONS, normalize_distances, pairwise_euclidean

__all__ = ["OTVAEQuantizer", "equipartition_targets"]


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _global_logsumexp_over_rows(log_values: torch.Tensor) -> torch.Tensor:
    """`logsumexp` over dim 0 (rows), across all ranks when torch.distributed is initialized."""
    local = torch.logsumexp(log_values, dim=0, keepdim=True)
    if _world_size() > 1:
        gathered = [torch.empty_like(local) for _ in range(_world_size())]
        dist.all_gather(gathered, local.contiguous())
        return torch.logsumexp(torch.cat(gathered, dim=0), dim=0, keepdim=True)
    return local


def _global_sum(values: torch.Tensor) -> torch.Tensor:
    if _world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def _global_count(count: int, device) -> int:
    if _world_size() > 1:
        total = torch.tensor([count], dtype=torch.long, device=device)
        dist.all_reduce(total)
        return int(total.item())
    return count


def _targets_log_domain(cost: torch.Tensor, epsilon: float, num_iters: int, global_rows: int) -> torch.Tensor:
    num_codes = cost.shape[1]
    log_plan = -epsilon * cost
    for _ in range(num_iters):
        log_plan = log_plan - _global_logsumexp_over_rows(log_plan) - math.log(num_codes)
        log_plan = log_plan - torch.logsumexp(log_plan, dim=1, keepdim=True) - math.log(global_rows)
    return torch.softmax(log_plan, dim=1)


def _targets_scaling(cost: torch.Tensor, epsilon: float, num_iters: int, global_rows: int) -> torch.Tensor | None:
    """Sinkhorn on scaling vectors: one `exp` of the cost, then two matrix-vector products per round.

    The plan is `diag(u) K diag(v)` with `K = exp(-epsilon * (cost - row minimum))` (a per-row shift is a row
    scaling, carried by `u`, and keeps each row's largest entry at 1). Returns `None` if a scaling over- or
    underflows, in which case the caller uses the log-domain recursion.
    """
    num_rows, num_codes = cost.shape
    row_minimum = cost.amin(dim=1, keepdim=True)
    kernel = torch.exp(-epsilon * (cost - row_minimum))
    # The shift is undone in the starting row scaling, so every round matches the unshifted recursion.
    row_scale = torch.exp(-epsilon * (row_minimum.squeeze(1) - row_minimum.min()))
    if not bool((row_scale > torch.finfo(row_scale.dtype).tiny).all()):
        return None
    column_scale = torch.ones(num_codes, dtype=kernel.dtype, device=kernel.device)
    for iteration in range(num_iters):
        column_totals = _global_sum(kernel.t() @ row_scale)
        column_scale = 1.0 / (column_totals * num_codes)
        if iteration < num_iters - 1:  # the last row scaling cancels in the final row normalization
            row_scale = 1.0 / ((kernel @ column_scale) * global_rows)
    if not (bool(torch.isfinite(column_scale).all()) and bool(torch.isfinite(row_scale).all())):
        return None
    targets = kernel.mul_(column_scale)
    totals = targets.sum(dim=1, keepdim=True)
    if not bool((totals > 0).all() and torch.isfinite(totals).all()):
        return None
    return targets.div_(totals)


@torch.no_grad()
def equipartition_targets(
    features: torch.Tensor,
    codebook: torch.Tensor,
    epsilon: float = 10.0,
    num_iters: int = 5,
    normalization: str = "all",
) -> torch.Tensor:
    """Soft OT targets `(N, K)`: a Sinkhorn plan with uniform code marginals, each row rescaled to sum to 1.

    Args:
        features (`torch.Tensor` of shape `(N, d)`): rows to assign.
        codebook (`torch.Tensor` of shape `(K, d)`): codes.
        epsilon (`float`): inverse temperature of `exp(-epsilon * cost)`.
        num_iters (`int`): Sinkhorn rounds (each: code marginals to `1/K`, then row marginals to `1/N`).
        normalization (`str`): cost normalization, as OptVQ's: `"all"`, `"dim"` or `"none"`.

    Runs on scaling vectors (fast) and falls back to a log-domain recursion where those over/underflow. Under
    `torch.distributed` the code marginals are all-reduced, so the plan covers the global batch (the `"all"`
    normalization statistics stay per rank).
    """
    if normalization not in VALID_NORMALIZATIONS:
        raise ValueError(f"`normalization` must be one of {VALID_NORMALIZATIONS}, got {normalization!r}.")
    features, codebook = features.detach().float(), codebook.detach().float()
    num_rows, num_codes = features.shape[0], codebook.shape[0]
    global_rows = _global_count(num_rows, features.device)
    if num_rows == 0:
        return features.new_zeros(0, num_codes)
    distances = pairwise_euclidean(features, codebook)
    if normalization == "dim":
        cost = distances / math.sqrt(codebook.shape[1])
    else:
        cost = normalize_distances(distances, normalization)
    cost = torch.nan_to_num(cost, nan=0.0, posinf=torch.finfo(cost.dtype).max / 4, neginf=0.0)
    if _world_size() == 1:
        targets = _targets_scaling(cost, epsilon, num_iters, global_rows)
        if targets is not None:
            return targets
        return _targets_log_domain(cost, epsilon, num_iters, global_rows)
    # Every rank must take the same path (collectives): agree on whether the scaling form stayed finite.
    targets = _targets_scaling(cost, epsilon, num_iters, global_rows)
    failed = torch.tensor([float(targets is None)], device=features.device)
    dist.all_reduce(failed)
    if float(failed) > 0:
        return _targets_log_domain(cost, epsilon, num_iters, global_rows)
    return targets


class OTVAEQuantizer(OptVQQuantizer):
    """OT-VAE quantizer (equipartition OT targets, Gumbel-softmax decoding, no stop-gradient / EMA / reset).

    Takes [`OptVQQuantizer`]'s arguments (`epsilon`, `num_iters`, `normalization` configure the target plan;
    `commitment_weight` weights the cross-entropy; `beta` is unused) plus:

    Args:
        gumbel_temperature (`float`, defaults to 1.0): temperature of the Gumbel-softmax sample decoded in training.
        gumbel_hard (`bool`, defaults to `False`): decode a one-hot sample with straight-through gradients instead
            of the soft sample.
        logit_scale (`float`, defaults to 1.0): logits are `-logit_scale * ||z - c||^2`.
    """

    def __init__(self, dim: int, codebook_size: int, num_heads: int = 1, use_projection: bool = True,
                 epsilon: float = 10.0, num_iters: int = 5, normalization: str = "all",
                 commitment_weight: float = 1.0, beta: float = 0.0, gumbel_temperature: float = 1.0,
                 gumbel_hard: bool = False, logit_scale: float = 1.0):
        super().__init__(dim, codebook_size, num_heads=num_heads, use_projection=use_projection, epsilon=epsilon,
                         num_iters=num_iters, normalization=normalization, commitment_weight=commitment_weight,
                         beta=beta, inference_assignment="nearest", training_assignment="nearest")
        if not (gumbel_temperature > 0 and math.isfinite(gumbel_temperature)):
            raise ValueError(f"`gumbel_temperature` must be a positive finite number, got {gumbel_temperature}.")
        if not (logit_scale > 0 and math.isfinite(logit_scale)):
            raise ValueError(f"`logit_scale` must be a positive finite number, got {logit_scale}.")
        self.gumbel_temperature = float(gumbel_temperature)
        self.gumbel_hard = bool(gumbel_hard)
        self.logit_scale = float(logit_scale)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, num_heads={self.num_heads}, "
            f"epsilon={self.epsilon}, num_iters={self.num_iters}, gumbel_temperature={self.gumbel_temperature}, "
            f"gumbel_hard={self.gumbel_hard}"
        )

    @property
    def assignment(self) -> str:
        return "gumbel" if self.training else "nearest"

    def logits(self, flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """`-logit_scale * ||z - c||^2`, `(N, K)`, differentiable in both arguments."""
        squared = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None])
        return -self.logit_scale * squared.clamp_min(0)

    def quantize_rows(self, flat: torch.Tensor, codebook: torch.Tensor):
        """OT cross-entropy loss (train and eval alike); the Gumbel-softmax decoding in training and the nearest
        code at inference. Layouts, heads, dtypes and statistics are handled by `OptVQQuantizer.forward`."""
        logits = self.logits(flat, codebook)
        targets = equipartition_targets(flat, codebook, self.epsilon, self.num_iters, self.normalization)
        log_probabilities = torch.log_softmax(logits, dim=1)
        loss = self.commitment_weight * -(targets * log_probabilities).sum(dim=1).mean()
        if flat.shape[0] == 0:
            loss = flat.sum() * 0.0
        if self.training:
            weights = nn.functional.gumbel_softmax(logits, tau=self.gumbel_temperature, hard=self.gumbel_hard)
            return weights @ codebook, loss, weights.detach().argmax(dim=1)
        token_ids = logits.detach().argmax(dim=1)
        return nn.functional.embedding(token_ids, codebook), loss, token_ids
