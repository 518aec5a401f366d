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
  covers the global batch (`sync_across_ranks`, `process_group`), and so does `sigma`; eval mode never communicates.
  In training the plan's rows are rebuilt entry by entry from its potentials
  ([`~optvq_hf.sinkhorn.sinkhorn_plan_potentials`]: `q_i = softmax_j(-k * ||z_i - c_j|| + b_j)`), so no `(N, K)`
  targets exist;
* loss = `commitment_weight * mean_i CE(q_i, p_i)`, without `(N, K)` matrices kept for backward (in training one
  fused pass with the decoding, `_GumbelDecode`, whose per-entry math lives in `optvq_hf.otvae_kernels` and runs as
  compiled kernels or eagerly block by block: `training_kernel`);
* Gumbel-softmax with temperature `gumbel_temperature`, soft (`gumbel_hard=False`) or straight-through hard. The
  noise of pair (row, code) is a hash of the pair and a seed (one draw from the device's default generator, so
  `torch.manual_seed` fixes it), computed again in backward instead of keeping the sample.

The member shares [`CodebookQuantizer`]'s parameters and interface (codebook table + optional shared projection,
heads, token layout, `embed_tokens`, statistics), so models, checkpoints and tools treat the whole family alike.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .codebook_losses import distance_cross_entropy, distance_std
from .otvae_kernels import (BACKWARD_ROW_ARGUMENTS, FORWARD_ROW_ARGUMENTS, backward_rows, compiled_backward,
                            compiled_forward, compiler_available, forward_rows, noise_keys, run_compiled)
from .quantization import CodebookQuantizer, register_quantizer
from .sinkhorn import (_EXP_FLOOR, VALID_NORMALIZATIONS, SinkhornWorkspace, _Distances, get_block_policy,
                       sinkhorn_plan, sinkhorn_plan_potentials)

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
    the `exponential_` draw of torch's version. (`OTVAEQuantizer`'s training pass does not use it: its noise is
    counter based, see `optvq_hf.otvae_kernels.exponential_noise`.)"""
    gumbels = torch.empty_like(logits).uniform_(torch.finfo(logits.dtype).tiny, 1.0).log_().neg_().log_().neg_()
    soft = torch.softmax((logits + gumbels) / temperature, dim=-1)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter_(-1, soft.argmax(dim=-1, keepdim=True), 1.0)
    return one_hot - soft.detach() + soft


# Entries per block of the eager training pass, by the engine's block policy (sinkhorn.set_block_policy): with passive
# OpenMP threads, 1 MiB float32 buffers that stay in cache; with spinning ones (OpenMP's default), each of the pass's
# many parallel ops ends in a barrier that can cost a scheduler slice when other processes compete for the cores, and
# 16 MiB blocks were 3x faster than 1 MiB ones at load 6 (docs/benchmarks.md); accelerators: fewer kernel launches.
_DECODE_BLOCK_ENTRIES = {"passive": 1 << 18, "active": 1 << 22}
_ACCELERATOR_DECODE_BLOCK_ENTRIES = 1 << 22
# The targets are rebuilt from the probabilities (q = p * e^b, rows normalized: no exp) while the code potentials
# span at most this many nats (e^-60 is still a normal float32; see _GumbelDecode).
_SHARED_KERNEL_SPREAD = 60.0


# The fused training pass runs its per-entry math compiled (otvae_kernels.compiled_forward / compiled_backward) from
# this many (row, code) pairs on (OTVAEQuantizer.training_kernel = "auto", CPU, a code dimension of at most
# _COMPILE_MAX_DIM): below it, compiling (seconds, once per process) does not pay, and the test suite stays eager.
_COMPILE_MIN_ENTRIES = 1 << 22
_COMPILE_MAX_DIM = 8
TRAINING_KERNELS = ("auto", "compiled", "eager")
_compile_failures: list[str] = []  # a compiled kernel raised: "auto" stays eager for the rest of the process


class _GumbelDecode(torch.autograd.Function):
    """OT-VAE's training pass with its own backward: the cross-entropy of `p = softmax(-s D)` to the targets
    `q = softmax(-k D + b)` (the Sinkhorn plan's rows, rebuilt from its [`~optvq_hf.sinkhorn.PlanPotentials`]) and the
    Gumbel-softmax decoding `y @ codebook`, with `D` the Euclidean distances (on the Sinkhorn engine's centered,
    power-of-two scaled operands). Nothing of size `N x K` is kept for backward: the per-entry math
    ([`~optvq_hf.otvae_kernels.forward_rows`], [`~optvq_hf.otvae_kernels.backward_rows`]) returns row and code sums
    only, and backward recomputes the distances, `p`, `q` and the sample, its noise included: the noise is a hash of
    (seed, row, code) ([`~optvq_hf.otvae_kernels.exponential_noise`]), the seed one draw from the device's default
    generator. `kernel` `"compiled"` runs it as one compiled kernel per direction over the whole batch, `"eager"`
    block by block (the engine's block policy sets the block size).

    With `L' = -s (D - min_j D)` (clamped at `_EXP_FLOOR` before `exp` where needed) and `P = exp(L')`:

    * `p = P / sum_j P`, and the loss row `CE_i = sum_j q_ij (logsumexp_j logits - logits_ij)
      = log sum_j P_ij - sum_j q_ij L'_ij` (the rows of `q` sum to 1);
    * `q = P e^b / sum_j P e^b` when `k = s` (`logit_scale = 1`: `p` is the plan's own kernel) and the code
      potentials span at most `_SHARED_KERNEL_SPREAD` nats (no second `exp`), else `exp(-k D + b - max)` normalized;
    * the Gumbel sample `softmax((logits + g) / T)` with `g = -log E`, `E` standard exponential: for `T = 1` it is
      `(P / E) / sum_j (P / E)`, otherwise `exp((L' - log E) / T - max)` normalized.

    Backward: with `gamma = d loss / d logits`, `d/dD = -s gamma` and `dD/dz = (z - c) / D`; the decoding's part is
    `y (dy - <y, dy>) / T` with `dy_ij = g_i . c_j` and `<y, dy>_i = g_i . ybar_i` (`ybar_i` the decoded vector: no
    extra pass).
    """

    @staticmethod
    def forward(ctx, features, codebook, code_potentials, target_scale, scale, weight, temperature, hard, kernel):
        num_rows, num_codes = features.shape[0], codebook.shape[0]
        device = features.device
        distances = _Distances(features.detach(), codebook.detach(), None, name="otvae")
        logit_scale, target_scale_block = scale / distances.scale, target_scale / distances.scale  # per lambda * D
        # no logit lies more than s * diam(codebook) below its row's largest (triangle inequality): clamp only if
        # that can reach _EXP_FLOOR
        clamp = logit_scale * 2 * float(distances.codebook.norm(dim=1).max()) > -_EXP_FLOOR
        wide = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        potentials = code_potentials.to(wide)
        potentials = potentials - potentials.max()
        shared = target_scale == scale and float(potentials.min()) >= -_SHARED_KERNEL_SPREAD
        code_weights = potentials.exp().float() if shared else potentials.float()  # e^b, or b
        decode_t = codebook.detach().t().contiguous()
        seed = int(torch.empty((), dtype=torch.int64, device=device).random_())  # the device's default generator
        scales = (features.new_tensor(logit_scale), features.new_tensor(target_scale_block))
        flags = dict(shared=shared, clamp=clamp, temperature=temperature)
        if kernel == "compiled":
            try:
                row_keys, code_keys = noise_keys(seed, 0, num_rows, num_codes, device)
                results = run_compiled(compiled_forward(device.type, shared, temperature),
                                       (distances.features, distances.codebook_t, decode_t, code_weights, *scales,
                                        row_keys, code_keys), FORWARD_ROW_ARGUMENTS)
            except Exception as error:  # noqa: BLE001 - any compiler failure: this process stays eager
                kernel = _compile_failed(error)
        if kernel == "eager":
            rows = _block_rows(num_codes, device)
            buffer = features.new_empty(min(rows, num_rows), num_codes)
            blocks = []
            for start in range(0, num_rows, rows):
                stop = min(start + rows, num_rows)
                row_keys, code_keys = noise_keys(seed, start, stop, num_codes, device)
                blocks.append(forward_rows(distances.block(start, stop, out=buffer[: stop - start]), None, None,
                                           decode_t, code_weights, *scales, row_keys, code_keys, fused=False, **flags))
            results = [None if parts[0] is None else torch.cat(parts) for parts in zip(*blocks)]
        row_min, prob_sums, target_sums, cross, target_max, sample_max, sample_sums, decoded_sums, token_ids = results
        mean_codes = decoded_sums / sample_sums[:, None]  # y @ codebook, the soft sample's decoding
        decoded = codebook.detach()[token_ids] if hard else mean_codes.clone()  # (mean_codes is saved)
        # the loss: CE_i = log sum_j P - sum_j q L' (the rows of q sum to 1)
        total = (prob_sums.log() - cross / target_sums).sum(dtype=wide)
        ctx.save_for_backward(features, codebook, token_ids, row_min, prob_sums, target_sums, target_max,
                              sample_sums, sample_max, mean_codes)
        ctx.code_weights, ctx.seed, ctx.kernel, ctx.flags = code_weights, seed, kernel, flags
        ctx.scale, ctx.target_scale, ctx.weight, ctx.hard = scale, target_scale, weight, hard
        ctx.mark_non_differentiable(token_ids)
        loss = (total * (weight / max(num_rows, 1))).to(features.dtype)
        return decoded, loss, token_ids

    @staticmethod
    def backward(ctx, grad_decoded, grad_loss, _grad_ids):
        (features, codebook, token_ids, row_min, prob_sums, target_sums, target_max, sample_sums, sample_max,
         mean_codes) = ctx.saved_tensors
        flags, temperature = ctx.flags, ctx.flags["temperature"]
        num_rows, num_codes = features.shape[0], codebook.shape[0]
        device = features.device
        distances = _Distances(features, codebook, None, name="otvae")
        scales = (features.new_tensor(ctx.scale / distances.scale), features.new_tensor(ctx.target_scale / distances.scale))
        decode_t = codebook.t().contiguous()
        # With gamma = d loss / d logits: d/dD = -s gamma and dD/dz = (z - c) / D = lambda (z - c) / (lambda D), so
        # the common factor -s * lambda goes into every row's coefficients, and each entry is divided by lambda * D.
        factor = -ctx.scale * distances.scale
        loss_factor = grad_loss * (ctx.weight / max(num_rows, 1)) * factor
        # the loss: factor * (p - q) = P * loss_rows + w * target_rows with p = P / sum P, q = w / sum w
        loss_rows = loss_factor / prob_sums
        target_rows = -loss_factor / target_sums
        # the decoding: factor * y (dy - <y, dy>) / T with y = sample / S, dy_ij = g_i . c_j, <y, dy>_i = g_i . ybar_i
        inverse_sums = 1.0 / sample_sums
        sample_rows = grad_decoded * (inverse_sums * (factor / temperature))[:, None]  # (N, d)
        sample_offsets = -(sample_rows * mean_codes).sum(1)
        # decoded = y @ codebook: d/dc_j = sum_i y_ij g_i (hard: the straight-through one-hot carries the code term)
        code_rows = None if ctx.hard else grad_decoded * inverse_sums[:, None]
        any_zero = bool((row_min == 0).any())  # a feature on a code: D = 0, gradient 0 there (as torch.cdist)
        row_stats = (row_min, target_max, sample_max, loss_rows, target_rows, sample_rows, sample_offsets, code_rows)
        kernel = ctx.kernel
        if kernel == "compiled":
            try:
                row_keys, code_keys = noise_keys(ctx.seed, 0, num_rows, num_codes, device)
                results = run_compiled(compiled_backward(device.type, flags["shared"], temperature, ctx.hard),
                                       (distances.features, distances.codebook_t, decode_t, features, ctx.code_weights,
                                        *scales, row_keys, code_keys, *row_stats), BACKWARD_ROW_ARGUMENTS)
            except Exception as error:  # noqa: BLE001 - any compiler failure: this process stays eager
                kernel = _compile_failed(error)
        if kernel == "eager":
            rows = _block_rows(num_codes, device)
            buffer = features.new_empty(min(rows, num_rows), num_codes)
            row_parts, code_totals = [], None
            for start in range(0, num_rows, rows):
                stop = min(start + rows, num_rows)
                row_keys, code_keys = noise_keys(ctx.seed, start, stop, num_codes, device)
                block_stats = [None if stat is None else stat[start:stop] for stat in row_stats]
                row_weights, code_sums, *code_parts = backward_rows(
                    distances.block(start, stop, out=buffer[: stop - start]), None, None, decode_t,
                    features[start:stop], ctx.code_weights, *scales, row_keys, code_keys, *block_stats,
                    any_zero=any_zero, fused=False, **flags)
                row_parts.append((row_weights, code_sums))
                code_totals = code_parts if code_totals is None else [
                    None if total is None else total.add_(part) for total, part in zip(code_totals, code_parts)]
            results = [torch.cat(parts) for parts in zip(*row_parts)] + code_totals
        row_weights, code_sums, feature_sums, code_weight_sums, decoding = results
        # dD_ij/dz_i = (z_i - c_j) / D_ij and dD_ij/dc_j = (c_j - z_i) / D_ij, summed with the weights gD
        grad_features = torch.addcmul(-code_sums, features, row_weights[:, None])
        grad_codebook = codebook * code_weight_sums[:, None] - feature_sums.t()
        if decoding is not None:
            grad_codebook += decoding.t()
        if ctx.hard:
            grad_codebook.index_add_(0, token_ids, grad_decoded)
        return grad_features, grad_codebook, None, None, None, None, None, None, None


def _block_rows(num_codes: int, device: torch.device) -> int:
    """Rows per block of the eager pass (its block policy's entries on CPU)."""
    entries = _DECODE_BLOCK_ENTRIES[get_block_policy()] if device.type == "cpu" else _ACCELERATOR_DECODE_BLOCK_ENTRIES
    return max(1, entries // num_codes)


def _compile_failed(error: Exception) -> str:
    """Record a compiled kernel's failure (warned once per process) and answer the kernel to use instead."""
    if not _compile_failures:
        warnings.warn(f"OT-VAE's compiled training kernel failed ({type(error).__name__}: {error}); using the eager "
                      "pass for the rest of this process.", RuntimeWarning, stacklevel=3)
    _compile_failures.append(repr(error))
    return "eager"


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
        training_kernel (`str`, defaults to `"auto"`): how the training pass runs its per-(row, code) math:
            `"compiled"` (one `torch.compile`d kernel per direction, compiled at the first training step),
            `"eager"` (block by block in eager PyTorch), or `"auto"`: compiled on CPU for batches of at least
            `2^22` (row, code) pairs with code dimension at most 8 where `torch.compile` can build C++ kernels,
            eager otherwise. Both give the same noise and values to float32 rounding. An attribute: set it on a
            built model (`model.quantizer.training_kernel = "eager"`); not saved in the config.
    """

    display_name = "OT-VAE"
    _legacy_optvq_subclass = True

    def __init__(self, dim: int, codebook_size: int, num_heads: int = 1, use_projection: bool = True,
                 epsilon: float = 10.0, num_iters: int = 5, normalization: str = "all",
                 commitment_weight: float = 1.0, beta: float = 0.0, gumbel_temperature: float = 1.0,
                 gumbel_hard: bool = False, logit_scale: float = 1.0, sync_across_ranks: bool = True,
                 quantization_loss: str = "l2", training_kernel: str = "auto"):
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
        self.training_kernel = training_kernel
        self.sinkhorn_workspace = SinkhornWorkspace()  # the training plan's (N, K) buffer, reused from step to step

    @property
    def training_kernel(self) -> str:
        """`"auto"`, `"compiled"` or `"eager"`: how the training pass runs (see the class docstring)."""
        return self._training_kernel

    @training_kernel.setter
    def training_kernel(self, value: str):
        if value not in TRAINING_KERNELS:
            raise ValueError(f"`training_kernel` must be one of {TRAINING_KERNELS}, got {value!r}.")
        self._training_kernel = value

    def resolved_training_kernel(self, flat: torch.Tensor) -> str:
        """The kernel the training pass uses for the rows `flat` `(N, d)`: `"compiled"` or `"eager"`."""
        if self.training_kernel != "auto":
            return self.training_kernel
        compiled = (flat.device.type == "cpu" and flat.shape[0] * self.codebook_size >= _COMPILE_MIN_ENTRIES
                    and flat.shape[1] <= _COMPILE_MAX_DIM and not _compile_failures and compiler_available())
        return "compiled" if compiled else "eager"

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

    def _training_rows(self, flat: torch.Tensor, codebook: torch.Tensor):
        """The training pass: the plan's potentials, then the fused loss and Gumbel decoding (`_GumbelDecode`).

        The loss and the decoding share each entry's logits, and the targets are rebuilt there from the plan's
        potentials (no (N, K) targets; the plan's passes run in the module's workspace). The logits' scale is the
        plan's own (global under sync), times logit_scale."""
        plan = sinkhorn_plan_potentials(flat, codebook, self.epsilon, self.num_iters, self.normalization,
                                        process_group=self.sync_group(), workspace=self.sinkhorn_workspace)
        return _GumbelDecode.apply(flat, codebook, plan.code_potentials, plan.distance_scale,
                                   self.logit_scale * plan.distance_scale, self.commitment_weight,
                                   self.gumbel_temperature, self.gumbel_hard, self.resolved_training_kernel(flat))

    def quantize_rows(self, flat: torch.Tensor, codebook: torch.Tensor):
        """OT cross-entropy loss (train and eval alike); the Gumbel-softmax decoding in training and the nearest
        code at inference. Layouts, heads, dtypes and statistics are handled by `CodebookQuantizer.forward`."""
        if flat.shape[0] == 0:
            return flat, flat.sum() * 0.0 + codebook.sum() * 0.0, flat.new_zeros(0, dtype=torch.long)
        if self.training:
            if torch.compiler.is_compiling():  # one compiled-graph boundary (the plan reads values back anyway)
                return torch.compiler.disable(self._training_rows)(flat, codebook)
            return self._training_rows(flat, codebook)
        # Block by block with its own backward: no (N, K) logits or softmax kept for backward.
        targets = self.targets(flat, codebook)
        scale = self.distance_scale(flat, codebook)
        loss = self.commitment_weight * distance_cross_entropy(flat, codebook, targets, scale=scale)
        token_ids = self.nearest(flat, codebook)  # the most likely code: argmax of the logits
        return nn.functional.embedding(token_ids, codebook), loss, token_ids
