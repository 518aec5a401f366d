"""OT-VAE quantizer: equipartition optimal-transport targets with Gumbel-softmax decoding.

From "Learning Discrete Representation with Optimal Transport Quantized Autoencoders" (OT-VAE). Instead of
stop-gradient losses, EMA updates or code resets, the assignment of features to codes is regularized by optimal
transport: over a batch, a Sinkhorn plan with uniform code marginals (every code receives the same mass, the
"equipartition" constraint of SeLa / SwAV clustering) gives soft *targets* `q`; the quantizer's own categorical
distribution `p(k | z) = softmax(-s * ||z - c_k||)` is trained towards them by cross-entropy, which moves both the
encoder features and the codes (no stop-gradient anywhere). During training the decoder receives a Gumbel-softmax
sample of `p` (`sum_k y_k c_k`), a differentiable stochastic decoding; at inference the token is the most likely
code, i.e. the nearest one, and the decoder receives that code.

How our implementation reads the paper (the summary available to us gives the method, not every constant):

* logits are `-s * ||z - c||`, Euclidean distances between a head's features and the (projected) codes on the
  target plan's own scale: `s = logit_scale * epsilon / sigma`, `sigma` what the plan's cost normalization divides the
  distances by (their standard deviation over the batch for `"all"`, `sqrt(d)` for `"dim"`, 1 for `"none"`), so that
  `p` is the plan's kernel before its marginal constraints and the targets are `p` made equipartitioned. (With
  `-||z - c||^2` at scale 1, as before, `p` was nearly uniform over many codes for the small MNIST code dimension: the
  Gumbel mixture decoded in training was an average of many codes, and at inference the nearest codes of the features
  concentrated on a few; see docs/quantizer.md, "OT-VAE");
* targets are the Sinkhorn engine's soft plan ([`~optvq_hf.sinkhorn.sinkhorn_plan`]) with OptVQ's cost (Euclidean
  distances normalized over the batch, `normalization`), inverse temperature `epsilon`, `num_iters` rounds and exact
  marginals, each row rescaled to sum to 1; they carry no gradient. In training under `torch.distributed` the plan
  covers the global batch (`sync_across_ranks`, `process_group`); eval mode never communicates;
* loss = `commitment_weight * mean_i CE(q_i, p_i)` (in eval mode block by block, without `(N, K)` matrices kept for
  backward);
* Gumbel-softmax with temperature `gumbel_temperature`, soft (`gumbel_hard=False`) or straight-through hard.

The member shares [`CodebookQuantizer`]'s parameters and interface (codebook table + optional shared projection,
heads, token layout, `embed_tokens`, statistics), so models, checkpoints and tools treat the whole family alike.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .codebook_losses import distance_cross_entropy, distance_std
from .quantization import CodebookQuantizer, register_quantizer
from .sinkhorn import VALID_NORMALIZATIONS, _Distances, sinkhorn_plan

__all__ = ["OTVAEQuantizer", "equipartition_targets", "gumbel_softmax"]


def equipartition_targets(features: torch.Tensor, codebook: torch.Tensor, epsilon: float = 10.0, num_iters: int = 5,
                          normalization: str = "all", process_group="world") -> torch.Tensor:
    """Soft OT targets `(N, K)`: a Sinkhorn plan with uniform code marginals, each row rescaled to sum to 1.

    [`~optvq_hf.sinkhorn.sinkhorn_plan`] with exact marginals (`marginal_guard=0`).

    Args:
        features (`torch.Tensor` of shape `(N, d)`): rows to assign.
        codebook (`torch.Tensor` of shape `(K, d)`): codes.
        epsilon (`float`): inverse temperature of `exp(-epsilon * cost)`.
        num_iters (`int`): Sinkhorn rounds (each: code marginals to `1/K`, then row marginals to `1/N`).
        normalization (`str`): cost normalization, as OptVQ's: `"all"`, `"dim"` or `"none"`.
        process_group (defaults to `"world"`): the ranks whose rows form the batch when `torch.distributed` is
            initialized (`None`: this process's rows alone).
    """
    return sinkhorn_plan(features, codebook, epsilon, num_iters, normalization, process_group=process_group)


def gumbel_softmax(logits: torch.Tensor, temperature: float = 1.0, hard: bool = False) -> torch.Tensor:
    """`softmax((logits + g) / temperature)` over the last axis with `g` standard Gumbel noise, as
    `torch.nn.functional.gumbel_softmax`; `hard=True` returns the one-hot of its argmax with the soft sample's
    gradient (straight-through). The noise is `-log(-log(u))` of uniform `u`: on CPU about 5x faster per entry than
    the `exponential_` draw of torch's version, which dominated OT-VAE's training step."""
    gumbels = torch.empty_like(logits).uniform_(torch.finfo(logits.dtype).tiny, 1.0).log_().neg_().log_().neg_()
    soft = torch.softmax((logits + gumbels) / temperature, dim=-1)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter_(-1, soft.argmax(dim=-1, keepdim=True), 1.0)
    return one_hot - soft.detach() + soft


_DECODE_BLOCK_ENTRIES = 1 << 18  # entries per block of the fused training pass (1 MiB in float32: cache-sized)


def _coordinate_sum(weights: torch.Tensor, codes_t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out = weights @ codes_t.T` for `weights` `(n, K)` and `codes_t` `(d, K)` with small `d`: one matrix-vector
    product per coordinate (a matmul with `d` output columns is slow on CPU for `d <= 4`)."""
    for k in range(codes_t.shape[0]):
        torch.mv(weights, codes_t[k], out=out[:, k])
    return out


class _GumbelDecode(torch.autograd.Function):
    """OT-VAE's training pass, block by block with its own backward: the cross-entropy of `softmax(-s D)` to the
    targets and the Gumbel-softmax decoding `y @ codebook`, with `D` the Euclidean distances from the Sinkhorn
    engine's distance blocks. Only the Gumbel sample `y` is kept for backward (it holds the noise); the distances,
    logits and softmax are recomputed per block."""

    @staticmethod
    def forward(ctx, features, codebook, targets, scale, divide_by_std, weight, temperature, hard):
        num_rows, num_codes = features.shape[0], codebook.shape[0]
        distances = _Distances(features.detach(), codebook.detach(), None, name="otvae")
        inverse = 1.0 / distances.scale  # a power of two: exact
        rows = max(1, _DECODE_BLOCK_ENTRIES // num_codes)
        wide = torch.float32 if features.device.type == "mps" else torch.float64  # MPS has no float64
        if divide_by_std:  # s = scale / std(D): a first pass, float64 sums (the scale carries no gradient)
            sums = features.new_zeros(2, dtype=wide)
            for start in range(0, num_rows, rows):
                distance = distances.block(start, min(start + rows, num_rows)).mul_(inverse)
                sums[0] += distance.sum(dtype=wide)
                sums[1] += torch.mul(distance, distance).sum(dtype=wide)
            count = num_rows * num_codes
            std = ((sums[1] - sums[0] * sums[0] / max(count, 1)).clamp_min(0) / max(count - 1, 1)).sqrt().float()
            scale = scale / (std + 1e-6)
        codes_t = codebook.detach().t().contiguous()
        decoded = features.new_empty(num_rows, codebook.shape[1])
        token_ids = torch.empty(num_rows, dtype=torch.long, device=features.device)
        samples = []
        log_norms = features.new_empty(num_rows)  # per row: the backward's softmax is exp(logits - log_norm)
        total = features.new_zeros((), dtype=wide)
        tiny = torch.finfo(features.dtype).tiny
        for start in range(0, num_rows, rows):
            stop = min(start + rows, num_rows)
            logits = distances.block(start, stop).mul_(-scale * inverse)
            block_targets = targets[start:stop]
            log_norm = torch.logsumexp(logits, dim=1)
            log_norms[start:stop] = log_norm
            total += (block_targets.sum(1) * log_norm - (block_targets * logits).sum(1)).sum(dtype=total.dtype)
            # Gumbel noise -log(-log u), as gumbel_softmax (the same draws in the same order)
            noise = torch.empty_like(logits).uniform_(tiny, 1.0).log_().neg_().log_()
            logits.sub_(noise)
            sample = torch.softmax(logits if temperature == 1.0 else logits.div_(temperature), dim=1)
            torch.argmax(sample, dim=1, out=token_ids[start:stop])
            if not hard:
                _coordinate_sum(sample, codes_t, decoded[start:stop])
            samples.append(sample)
        if hard:
            decoded = codebook.detach()[token_ids]
        ctx.save_for_backward(features, codebook, targets, token_ids, log_norms)
        ctx.samples, ctx.rows, ctx.scale, ctx.weight, ctx.temperature = samples, rows, scale, weight, temperature
        ctx.hard = hard
        ctx.mark_non_differentiable(token_ids)
        loss = (total * (weight / max(num_rows, 1))).to(features.dtype)
        return decoded, loss, token_ids

    @staticmethod
    def backward(ctx, grad_decoded, grad_loss, _grad_ids):
        features, codebook, targets, token_ids, log_norms = ctx.saved_tensors
        samples, rows, scale, temperature = ctx.samples, ctx.rows, ctx.scale, ctx.temperature
        num_rows = features.shape[0]
        distances = _Distances(features, codebook, None, name="otvae")
        inverse = 1.0 / distances.scale
        codes_t = codebook.t().contiguous()
        grad_features = torch.empty_like(features)
        grad_codebook_t = torch.zeros_like(codes_t)  # (d, K): one matrix-vector product per coordinate
        code_weights = codebook.new_zeros(codebook.shape[0])
        loss_factor = grad_loss * (ctx.weight / max(num_rows, 1))
        row_weights = features.new_empty(rows, 1)
        for index, start in enumerate(range(0, num_rows, rows)):
            stop = min(start + rows, num_rows)
            block, sample, grad_rows = features[start:stop], samples[index], grad_decoded[start:stop]
            distance = distances.block(start, stop).mul_(inverse)
            # d loss / d logits: weight * (softmax * sum(targets) - targets) / N, as torch's cross-entropy
            block_targets = targets[start:stop]
            grad_logits = torch.mul(distance, -scale).sub_(log_norms[start:stop, None]).exp_()  # the softmax
            grad_logits.mul_(block_targets.sum(1, keepdim=True)).sub_(block_targets).mul_(loss_factor)
            # through y = softmax((logits + g) / T) and decoded = y @ codebook: y (dy - <y, dy>) / T, dy = g_out C^T
            grad_sample = torch.mul(grad_rows[:, :1], codes_t[:1])
            for k in range(1, codes_t.shape[0]):
                grad_sample.addcmul_(grad_rows[:, k : k + 1], codes_t[k : k + 1])
            if not ctx.hard:  # hard: the straight-through one-hot (decoded = one_hot @ codebook) carries the code term
                for k in range(codes_t.shape[0]):
                    grad_codebook_t[k].addmv_(sample.t(), grad_rows[:, k])
            dot = (sample * grad_sample).sum(1, keepdim=True)
            grad_logits.addcmul_(sample, grad_sample.sub_(dot), value=1.0 / temperature)
            # logits = -s D; d D / dz = (z - c) / D (0 at z = c, as torch.cdist)
            grad_distance = grad_logits.mul_(-scale).div_(distance).masked_fill_(distance == 0, 0.0)
            torch.sum(grad_distance, dim=1, keepdim=True, out=row_weights[: stop - start])
            _coordinate_sum(grad_distance, codes_t, grad_features[start:stop])
            grad_features[start:stop] = block * row_weights[: stop - start] - grad_features[start:stop]
            for k in range(codes_t.shape[0]):
                grad_codebook_t[k].addmv_(grad_distance.t(), block[:, k], alpha=-1.0)
            code_weights += grad_distance.sum(0)
        grad_codebook = grad_codebook_t.t() + codebook * code_weights[:, None]
        if ctx.hard:
            grad_codebook.index_add_(0, token_ids, grad_decoded)
        return grad_features, grad_codebook, None, None, None, None, None, None


@register_quantizer("otvae")
class OTVAEQuantizer(CodebookQuantizer):
    """OT-VAE quantizer (equipartition OT targets, Gumbel-softmax decoding, no stop-gradient / EMA / reset).

    Takes [`CodebookQuantizer`]'s arguments (`commitment_weight` weights the cross-entropy; `beta` and
    `quantization_loss` do not apply) plus:

    Args:
        epsilon (`float`, defaults to 10.0), num_iters (`int`, defaults to 5), normalization (`str`, defaults to
            `"all"`): the target plan's inverse temperature, rounds and cost normalization.
        gumbel_temperature (`float`, defaults to 1.0): temperature of the Gumbel-softmax sample decoded in training.
        gumbel_hard (`bool`, defaults to `False`): decode a one-hot sample with straight-through gradients instead
            of the soft sample.
        logit_scale (`float`, defaults to 1.0): logits are `-logit_scale * epsilon * ||z - c|| / sigma` (`sigma`: the
            distance scale of the plan's cost normalization, see [`distance_scale`]).
    """

    display_name = "OT-VAE"
    _legacy_optvq_subclass = True

    def __init__(self, dim: int, codebook_size: int, num_heads: int = 1, use_projection: bool = True,
                 epsilon: float = 10.0, num_iters: int = 5, normalization: str = "all",
                 commitment_weight: float = 1.0, beta: float = 0.0, gumbel_temperature: float = 1.0,
                 gumbel_hard: bool = False, logit_scale: float = 1.0, sync_across_ranks: bool = True,
                 quantization_loss: str = "l2"):
        super().__init__(dim, codebook_size, num_heads=num_heads, use_projection=use_projection,
                         commitment_weight=commitment_weight, beta=beta, sync_across_ranks=sync_across_ranks,
                         quantization_loss=quantization_loss)
        if normalization not in VALID_NORMALIZATIONS:
            raise ValueError(f"`normalization` must be one of {VALID_NORMALIZATIONS}, got {normalization!r}.")
        if not (gumbel_temperature > 0 and math.isfinite(gumbel_temperature)):
            raise ValueError(f"`gumbel_temperature` must be a positive finite number, got {gumbel_temperature}.")
        if not (logit_scale > 0 and math.isfinite(logit_scale)):
            raise ValueError(f"`logit_scale` must be a positive finite number, got {logit_scale}.")
        self.epsilon = float(epsilon)
        self.num_iters = int(num_iters)
        self.normalization = normalization
        self.gumbel_temperature = float(gumbel_temperature)
        self.gumbel_hard = bool(gumbel_hard)
        self.logit_scale = float(logit_scale)

    @classmethod
    def config_kwargs(cls, config) -> dict:
        return dict(super().config_kwargs(config), epsilon=config.epsilon, num_iters=config.num_iters,
                    normalization=config.normalization, gumbel_temperature=config.gumbel_temperature,
                    gumbel_hard=config.gumbel_hard)

    @classmethod
    def validate_config(cls, config):
        if config.quantization_loss != "l2":
            warnings.warn(
                f"quantization_loss={config.quantization_loss!r} does not apply to quantizer_type='otvae': its loss is "
                "the cross-entropy to the equipartition targets.",
                UserWarning,
                stacklevel=3,
            )

    @classmethod
    def describe(cls, config) -> tuple[str, str]:
        return (
            "OT-VAE quantization (equipartition optimal-transport targets, Gumbel-softmax decoding in training, "
            "nearest code at inference)",
            "Gumbel-softmax samples trained towards equipartition Sinkhorn targets",
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, num_heads={self.num_heads}, "
            f"epsilon={self.epsilon}, num_iters={self.num_iters}, gumbel_temperature={self.gumbel_temperature}, "
            f"gumbel_hard={self.gumbel_hard}"
        )

    @property
    def assignment(self) -> str:
        return "gumbel" if self.training else "nearest"

    def distance_scale(self, flat: torch.Tensor, codebook: torch.Tensor,
                       distances: torch.Tensor | None = None) -> float | torch.Tensor:
        """`s` of the logits `-s * ||z - c||`: `logit_scale * epsilon` over the scale that the target plan's cost
        normalization divides the distances by (the distances' standard deviation for `"all"`, `sqrt(d)` for
        `"dim"`, 1 for `"none"`), so that `softmax(logits)` is the plan's own kernel before its marginal constraints.
        `distances` (the `(N, K)` distances, if already computed) saves a pass; the scale carries no gradient.
        """
        scale = self.logit_scale * self.epsilon
        if self.normalization == "dim":
            return scale / math.sqrt(flat.shape[1])
        if self.normalization == "all":
            std = distance_std(flat, codebook) if distances is None else distances.detach().std()
            return scale / (std + 1e-6)
        return scale

    def logits(self, flat: torch.Tensor, codebook: torch.Tensor, scale: float | torch.Tensor | None = None) -> torch.Tensor:
        """`-s * ||z - c||` with `s` = [`distance_scale`], `(N, K)`, differentiable in both arguments."""
        scale = self.distance_scale(flat, codebook) if scale is None else scale
        return -scale * torch.cdist(flat, codebook)

    def targets(self, flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """The equipartition targets `(N, K)` of this call (the global batch in synced training)."""
        plan = torch.compiler.disable(sinkhorn_plan) if torch.compiler.is_compiling() else sinkhorn_plan
        return plan(flat, codebook, self.epsilon, self.num_iters, self.normalization, process_group=self.sync_group())

    def quantize_rows(self, flat: torch.Tensor, codebook: torch.Tensor):
        """OT cross-entropy loss (train and eval alike); the Gumbel-softmax decoding in training and the nearest
        code at inference. Layouts, heads, dtypes and statistics are handled by `CodebookQuantizer.forward`."""
        if flat.shape[0] == 0:
            return flat, flat.sum() * 0.0 + codebook.sum() * 0.0, flat.new_zeros(0, dtype=torch.long)
        targets = self.targets(flat, codebook)
        if self.training:
            if torch.compiler.is_compiling():  # tensor ops only, so a compiled graph does not break
                distances = torch.cdist(flat, codebook)
                logits = distances * -self.distance_scale(flat, codebook, distances)
                loss = self.commitment_weight * nn.functional.cross_entropy(logits, targets)
                weights = gumbel_softmax(logits, self.gumbel_temperature, self.gumbel_hard)
                return weights @ codebook, loss, weights.detach().argmax(dim=1)
            # One fused pass, block by block: the loss and the Gumbel decoding share each block's logits.
            divide_by_std = self.normalization == "all"
            scale = self.logit_scale * self.epsilon if divide_by_std else self.distance_scale(flat, codebook)
            return _GumbelDecode.apply(flat, codebook, targets.detach().to(flat.dtype), scale, divide_by_std,
                                       self.commitment_weight, self.gumbel_temperature, self.gumbel_hard)
        # Block by block with its own backward: no (N, K) logits or softmax kept for backward.
        scale = self.distance_scale(flat, codebook)
        loss = self.commitment_weight * distance_cross_entropy(flat, codebook, targets, scale=scale)
        token_ids = self.nearest(flat, codebook)  # the most likely code: argmax of the logits
        return nn.functional.embedding(token_ids, codebook), loss, token_ids
