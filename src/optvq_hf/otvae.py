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
from .sinkhorn import VALID_NORMALIZATIONS, sinkhorn_plan

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
            # The Gumbel decoding needs the (N, K) logits anyway: the loss reuses them.
            distances = torch.cdist(flat, codebook)
            scale = self.distance_scale(flat, codebook, distances)
            logits = distances * -scale
            loss = self.commitment_weight * nn.functional.cross_entropy(logits, targets)
            weights = gumbel_softmax(logits, self.gumbel_temperature, self.gumbel_hard)
            return weights @ codebook, loss, weights.detach().argmax(dim=1)
        # Block by block with its own backward: no (N, K) logits or softmax kept for backward.
        scale = self.distance_scale(flat, codebook)
        loss = self.commitment_weight * distance_cross_entropy(flat, codebook, targets, scale=scale)
        token_ids = self.nearest(flat, codebook)  # the most likely code: argmax of the logits
        return nn.functional.embedding(token_ids, codebook), loss, token_ids
