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
  In training the plan's rows are rebuilt block by block from its potentials
  ([`~optvq_hf.sinkhorn.sinkhorn_plan_potentials`]: `q_i = softmax_j(-k * ||z_i - c_j|| + b_j)`), so no `(N, K)`
  targets exist;
* loss = `commitment_weight * mean_i CE(q_i, p_i)`, block by block without `(N, K)` matrices kept for backward (in
  training one fused pass with the decoding, `_GumbelDecode`);
* Gumbel-softmax with temperature `gumbel_temperature`, soft (`gumbel_hard=False`) or straight-through hard. On CPU
  the fused pass draws its uniforms from numpy's PCG64 seeded by torch's default generator (`torch.manual_seed` fixes
  them), and draws them again in backward instead of keeping the sample.

The member shares [`CodebookQuantizer`]'s parameters and interface (codebook table + optional shared projection,
heads, token layout, `embed_tokens`, statistics), so models, checkpoints and tools treat the whole family alike.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import nn

from .codebook_losses import distance_cross_entropy, distance_std
from .quantization import CodebookQuantizer, register_quantizer
from .sinkhorn import (_EXP_FLOOR, VALID_NORMALIZATIONS, SinkhornWorkspace, _Distances, _first_extreme_per_row,
                       get_block_policy, sinkhorn_plan, sinkhorn_plan_potentials)

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
    the `exponential_` draw of torch's version. (`OTVAEQuantizer` uses it on its dense path, under `torch.compile`;
    its eager training pass draws its own noise, see `_UniformDraws`.)"""
    gumbels = torch.empty_like(logits).uniform_(torch.finfo(logits.dtype).tiny, 1.0).log_().neg_().log_().neg_()
    soft = torch.softmax((logits + gumbels) / temperature, dim=-1)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter_(-1, soft.argmax(dim=-1, keepdim=True), 1.0)
    return one_hot - soft.detach() + soft


# Entries per block of the fused training pass, by the engine's block policy (sinkhorn.set_block_policy): with passive
# OpenMP threads, 1 MiB float32 buffers that stay in cache; with spinning ones (OpenMP's default), each of the pass's
# many parallel ops ends in a barrier that can cost a scheduler slice when other processes compete for the cores, and
# 16 MiB blocks were 3x faster than 1 MiB ones at load 6 (docs/benchmarks.md); accelerators: fewer kernel launches.
_DECODE_BLOCK_ENTRIES = {"passive": 1 << 18, "active": 1 << 22}
_ACCELERATOR_DECODE_BLOCK_ENTRIES = 1 << 22
# The targets are rebuilt from the probabilities (q = p * e^b, rows normalized: no exp) while the code potentials
# span at most this many nats (e^-60 is still a normal float32; see _GumbelDecode).
_SHARED_KERNEL_SPREAD = 60.0


class _UniformDraws:
    """The uniform draws of the fused pass's Gumbel noise, block by block, and the same draws again for the backward
    ([`replay`]), so that no noise is kept.

    On CPU the draws come from numpy's PCG64 (about 1.5x to 2x faster per entry than torch's CPU `uniform_`, which
    dominated the pass), seeded by one 63-bit draw from torch's default CPU generator: `torch.manual_seed` fixes
    them. numpy's float32 draws are the multiples of `2^-24` in `[0, 1)`; a 0 draw (probability `2^-24`) gives the
    noise `E = -log u = inf`, i.e. a zero weight in the sample, where torch's `uniform_(tiny, 1.0)` would give
    `E = 87.3` (an equally negligible weight). On CUDA they are `uniform_(tiny, 1.0)` from the device's default
    generator, replayed from a copy of its state. Elsewhere they cannot be replayed (`replay` returns `None`).
    """

    def __init__(self, device: torch.device, seed: int | None = None, generator_state=None):
        self.device = device
        self.generator = None
        if device.type == "cpu":
            if seed is None:
                seed = int(torch.empty((), dtype=torch.int64).random_())  # from the default generator
            self.seed, self.numpy_generator = seed, np.random.Generator(np.random.PCG64(seed))
        elif device.type == "cuda":
            if generator_state is None:
                index = device.index if device.index is not None else torch.cuda.current_device()
                generator_state = torch.cuda.default_generators[index].get_state()
            else:
                self.generator = torch.Generator(device=device)
                self.generator.set_state(generator_state)
            self.generator_state = generator_state
        self.tiny = torch.finfo(torch.float32).tiny

    def fill(self, out: torch.Tensor) -> torch.Tensor:
        """Fill the contiguous float32 `out` with the next draws."""
        if self.device.type == "cpu":
            self.numpy_generator.random(dtype=np.float32, out=out.numpy())
            return out
        return out.uniform_(self.tiny, 1.0, generator=self.generator)

    def replay(self) -> _UniformDraws | None:
        """A stream that draws this one's values again from the start (`None` where that is not possible)."""
        if self.device.type == "cpu":
            return _UniformDraws(self.device, seed=self.seed)
        if self.device.type == "cuda":
            return _UniformDraws(self.device, generator_state=self.generator_state)
        return None


class _GumbelDecode(torch.autograd.Function):
    """OT-VAE's training pass, block by block with its own backward: the cross-entropy of `p = softmax(-s D)` to the
    targets `q = softmax(-k D + b)` (the Sinkhorn plan's rows, rebuilt from its
    [`~optvq_hf.sinkhorn.PlanPotentials`]) and the Gumbel-softmax decoding `y @ codebook`, with `D` the Euclidean
    distances from the Sinkhorn engine's distance blocks. Nothing of size `N x K` is kept for backward: per block,
    the distances, `p`, `q` and the sample `y` are recomputed, the Gumbel noise drawn again from a copy of the
    generator's state taken before the forward drew it (on devices whose generator cannot be copied, the samples are
    kept instead).

    Per block, with `L' = logits - max_j logits <= 0` (clamped at `_EXP_FLOOR`) and `P = exp(L')`:

    * `p = P / sum_j P`, and the loss row `CE_i = sum_j q_ij (logsumexp_j logits - logits_ij)
      = log sum_j P_ij - sum_j q_ij L'_ij` (the rows of `q` sum to 1);
    * `q = P e^b / sum_j P e^b` when `k = s` (`logit_scale = 1`: `p` is the plan's own kernel) and the code
      potentials span at most `_SHARED_KERNEL_SPREAD` nats (no `exp`), else `exp(-k D + b - max)` normalized;
    * the Gumbel sample `softmax((logits + g) / T)` with `g = -log E`, `E = -log u` standard exponential: for
      `T = 1` it is `(P / E) / sum_j (P / E)` (one `log` and no `exp` per entry), otherwise
      `exp((L' - log E) / T - max)` normalized. The uniform draws `u` are [`gumbel_softmax`]'s, in the same order,
      so a seed gives the same sample (up to float32 rounding) as the dense graph.
    """

    @staticmethod
    def forward(ctx, features, codebook, code_potentials, target_scale, scale, weight, temperature, hard):
        num_rows, num_codes = features.shape[0], codebook.shape[0]
        device = features.device
        distances = _Distances(features.detach(), codebook.detach(), None, name="otvae")
        logit_scale, target_scale_block = scale / distances.scale, target_scale / distances.scale  # per lambda * D
        # no logit lies more than s * diam(codebook) below its row's largest (triangle inequality): clamp only if
        # that can reach _EXP_FLOOR
        clamp = logit_scale * 2 * float(distances.codebook.norm(dim=1).max()) > -_EXP_FLOOR
        block_entries = (_DECODE_BLOCK_ENTRIES[get_block_policy()] if device.type == "cpu"
                         else _ACCELERATOR_DECODE_BLOCK_ENTRIES)
        rows = max(1, block_entries // num_codes)
        wide = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        potentials = code_potentials.to(wide)
        potentials = potentials - potentials.max()
        shared = target_scale == scale and float(potentials.min()) >= -_SHARED_KERNEL_SPREAD
        code_weights = potentials.exp().float() if shared else potentials.float()  # e^b, or b
        codes_t = codebook.detach().t().contiguous()
        draws = _UniformDraws(device)
        replay = draws.replay()

        mean_codes_t = features.new_empty(codebook.shape[1], num_rows)  # (y @ codebook)^T: contiguous mv outputs
        token_ids = torch.empty(num_rows, dtype=torch.long, device=device)
        row_min = features.new_empty(num_rows)  # each row's smallest lambda * D
        prob_sums = features.new_empty(num_rows)  # sum_j P
        target_sums = features.new_empty(num_rows)  # sum_j w, the targets' weights (q = w / sum_j w)
        cross = features.new_empty(num_rows)  # sum_j w L'
        target_max = features.new_empty(num_rows)  # (not shared) each row's largest -k D + b
        sample_sums = features.new_empty(num_rows)
        sample_max = features.new_empty(num_rows)  # (T != 1) each row's largest (L' - log E) / T
        samples = [] if replay is None else None
        logits, prob, noise = _block_buffers(3, rows, num_codes, features)  # few buffers: they stay in cache
        for start in range(0, num_rows, rows):
            stop = min(start + rows, num_rows)
            size = stop - start
            distance_block = distances.block(start, stop, out=logits[:size])  # lambda * D
            torch.amin(distance_block, dim=1, out=row_min[start:stop])
            if not shared:  # w = exp(-k D + b - max), from the distances before they become the logits
                weights = _target_weights(distance_block, code_weights, target_scale_block, noise[:size],
                                          target_max[start:stop], recompute=False)
                torch.sum(weights, dim=1, out=target_sums[start:stop])
            logits_block = _relative_logits(distance_block, row_min[start:stop], logit_scale, distance_block)
            prob_block = _exp(logits_block, clamp, out=prob[:size])
            torch.sum(prob_block, dim=1, out=prob_sums[start:stop])
            if shared:  # w = P e^b
                torch.mv(prob_block, code_weights, out=target_sums[start:stop])
                torch.mv(torch.mul(prob_block, logits_block, out=noise[:size]), code_weights, out=cross[start:stop])
            else:
                torch.sum(weights.mul_(logits_block), dim=1, out=cross[start:stop])
            sample = _gumbel_sample(prob_block, logits_block, draws.fill(noise[:size]), temperature,
                                    sample_max[start:stop], recompute=False)  # unnormalized
            torch.sum(sample, dim=1, out=sample_sums[start:stop])
            _first_extreme_per_row(sample, token_ids[start:stop], largest=temperature != 1.0)  # -P / E if T = 1
            for k in range(codes_t.shape[0]):
                torch.mv(sample, codes_t[k], out=mean_codes_t[k, start:stop])
            if samples is not None:
                samples.append(sample.clone())
        mean_codes = mean_codes_t.t().div(sample_sums[:, None])  # y @ codebook, the soft sample's decoding
        decoded = codebook.detach()[token_ids] if hard else mean_codes
        # the loss: CE_i = log sum_j P - sum_j q L' (the rows of q sum to 1)
        total = (prob_sums.log() - cross / target_sums).sum(dtype=wide)
        ctx.save_for_backward(features, codebook, token_ids, row_min, prob_sums, target_sums, target_max,
                              sample_sums, sample_max, mean_codes)
        ctx.code_weights, ctx.draws, ctx.samples, ctx.shared, ctx.rows = code_weights, replay, samples, shared, rows
        ctx.target_scale, ctx.scale, ctx.weight, ctx.temperature, ctx.hard = target_scale, scale, weight, temperature, hard
        ctx.clamp = clamp
        ctx.mark_non_differentiable(token_ids)
        loss = (total * (weight / max(num_rows, 1))).to(features.dtype)
        return decoded.clone() if not hard else decoded, loss, token_ids

    @staticmethod
    def backward(ctx, grad_decoded, grad_loss, _grad_ids):
        (features, codebook, token_ids, row_min, prob_sums, target_sums, target_max, sample_sums, sample_max,
         mean_codes) = ctx.saved_tensors
        rows, temperature, code_weights, draws = ctx.rows, ctx.temperature, ctx.code_weights, ctx.draws
        num_rows, num_codes = features.shape[0], codebook.shape[0]
        distances = _Distances(features, codebook, None, name="otvae")
        logit_scale, target_scale_block = ctx.scale / distances.scale, ctx.target_scale / distances.scale
        codes_t = codebook.t().contiguous()
        # With gamma = d loss / d logits: d/dD = -s gamma and dD/dz = (z - c) / D = lambda (z - c) / (lambda D), so
        # the common factor -s * lambda goes into every row's coefficients, and each block is divided by lambda * D.
        factor = -ctx.scale * distances.scale
        loss_factor = grad_loss * (ctx.weight / max(num_rows, 1)) * factor
        # the loss: factor * (p - q) = P * (loss_rows - target_rows * w) with p = P / sum P, q = w / sum w
        loss_rows = (loss_factor / prob_sums)[:, None]
        target_rows = (-loss_factor / target_sums)[:, None]
        # the decoding: factor * y (dy - <y, dy>) / T with y = sample / S, dy_ij = g_i . c_j, <y, dy>_i = g_i . ybar_i
        inverse_sums = 1.0 / sample_sums
        sample_rows = grad_decoded * (inverse_sums * (factor / temperature))[:, None]  # (N, d)
        sample_offsets = -(sample_rows * mean_codes).sum(1, keepdim=True)
        # decoded = y @ codebook: d/dc_j = sum_i y_ij g_i. Per-coordinate rows are kept contiguous ((d, N)): a
        # matrix-vector product with a strided vector is 3x slower on CPU
        code_rows_t = (grad_decoded * inverse_sums[:, None]).t().contiguous()
        # sum_i gD_ij z_i and sum_i gD_ij in one (d + 1, n) @ (n, K) product per block
        features_aug_t = torch.cat([features.t(), features.new_ones(1, num_rows)]).contiguous()
        any_zero = bool((row_min == 0).any())  # a feature on a code: D = 0, gradient 0 there (as torch.cdist)

        sums_t = features.new_empty(codebook.shape[1], num_rows)  # sum_j gD_ij c_j, per coordinate
        row_weights = features.new_empty(num_rows)  # sum_j gD_ij
        decoding_t = codebook.new_zeros(codebook.shape[1], num_codes)  # sum_i y_ij g_i
        distance_t = codebook.new_zeros(codebook.shape[1] + 1, num_codes)  # sum_i gD_ij z_i, and sum_i gD_ij
        distance, logits, grad_logits, noise = _block_buffers(4, rows, num_codes, features)
        for index, start in enumerate(range(0, num_rows, rows)):
            stop = min(start + rows, num_rows)
            size = stop - start
            distance_block = distances.block(start, stop, out=distance[:size])
            logits_block = _relative_logits(distance_block, row_min[start:stop], logit_scale, logits[:size])
            sample = None
            if draws is not None:  # the forward's noise, drawn again
                uniform = draws.fill(noise[:size])
                if temperature != 1.0:  # from the logits, before they become P
                    sample = _gumbel_sample(None, logits_block, uniform, temperature, sample_max[start:stop], True)
            else:
                sample = ctx.samples[index].clone()  # (modified below; a retained graph may run backward again)
            prob_block = _exp(logits_block, ctx.clamp, out=logits_block)  # P (the logits are not needed any more)
            if sample is None:
                sample = _gumbel_sample(prob_block, None, uniform, temperature, None, True)
            if not ctx.hard:  # hard: the straight-through one-hot (decoded = one_hot @ codebook) carries the code term
                decoding_t.addmm_(code_rows_t[:, start:stop], sample)
            # the decoding's part, sample * dy, in the sample's buffer (dy built first where the gradient goes)
            grad_block = grad_logits[:size]
            dy = torch.mul(sample_rows[start:stop, :1], codes_t[:1], out=grad_block)
            dy.add_(sample_offsets[start:stop])
            for k in range(1, codes_t.shape[0]):
                dy.addcmul_(sample_rows[start:stop, k : k + 1], codes_t[k : k + 1])
            decoding_part = sample.mul_(dy)
            if ctx.shared:  # w = P e^b (outer products as mul then add: a 3-operand broadcast addcmul is 5x slower)
                torch.mul(target_rows[start:stop], code_weights, out=grad_block)
                grad_block.add_(loss_rows[start:stop]).mul_(prob_block)
            else:
                _target_weights(distance_block, code_weights, target_scale_block, grad_block, target_max[start:stop],
                                recompute=True).mul_(target_rows[start:stop])
                grad_block.addcmul_(prob_block, loss_rows[start:stop])
            grad_block.add_(decoding_part)
            grad_distance = grad_block.div_(distance_block)
            if any_zero:
                grad_distance.masked_fill_(distance_block == 0, 0.0)
            torch.sum(grad_distance, dim=1, out=row_weights[start:stop])
            for k in range(codes_t.shape[0]):
                torch.mv(grad_distance, codes_t[k], out=sums_t[k, start:stop])
            distance_t.addmm_(features_aug_t[:, start:stop], grad_distance)
        # dD_ij/dz_i = (z_i - c_j) / D_ij and dD_ij/dc_j = (c_j - z_i) / D_ij, summed with the weights gD
        grad_features = torch.addcmul(-sums_t.t(), features, row_weights[:, None])
        grad_codebook = (decoding_t - distance_t[:-1]).t() + codebook * distance_t[-1][:, None]
        if ctx.hard:
            grad_codebook.index_add_(0, token_ids, grad_decoded)
        return grad_features, grad_codebook, None, None, None, None, None, None


def _block_buffers(count: int, rows: int, num_codes: int, like: torch.Tensor) -> list[torch.Tensor]:
    """`count` block-sized buffers `(rows, num_codes)`, reused from block to block (sliced for the last one)."""
    return [like.new_empty(rows, num_codes) for _ in range(count)]


def _relative_logits(distance, row_min, scale, out):
    """`L' = -scale * (distance - row_min)`: each row's logits minus their largest."""
    return torch.add((row_min * scale)[:, None], distance, alpha=-scale, out=out)


def _exp(logits, clamp, out):
    """`exp(logits)`, with the logits first raised to `_EXP_FLOOR` if `clamp` (`exp` of anything lower is far below
    float32 resolution of a row's total, and takes a slow path on CPU)."""
    if not clamp:
        return torch.exp(logits, out=out)
    return torch.clamp(logits, min=_EXP_FLOOR, out=out).exp_()


def _target_weights(distance, code_potentials, scale, out, row_max, recompute):
    """`exp(-scale * distance + b - max)`: the targets' weights of a block of rows, up to each row's factor
    (`row_max` is written unless `recompute`, then read)."""
    torch.add(code_potentials, distance, alpha=-scale, out=out)
    if not recompute:
        torch.amax(out, dim=1, out=row_max)
    return out.sub_(row_max[:, None]).clamp_min_(_EXP_FLOOR).exp_()


def _gumbel_sample(prob, logits, uniform, temperature, sample_max, recompute):
    """The unnormalized Gumbel-softmax sample of a block, in `uniform`'s buffer: `-P / E <= 0` for `T = 1`
    (`logits` and `sample_max` unused), else `exp((L' - log E) / T - max) > 0` (`prob` unused; `sample_max` holds
    each row's max: written unless `recompute`, then read). Either way `y = sample / sum_j sample`."""
    log_uniform = uniform.log_()  # -E
    if temperature == 1.0:  # -P / E: the sign cancels in y = sample / sum_j sample
        return torch.div(prob, log_uniform, out=log_uniform)
    perturbed = torch.sub(logits, log_uniform.neg_().log_(), out=log_uniform).div_(temperature)
    if not recompute:
        torch.amax(perturbed, dim=1, out=sample_max)
    return perturbed.sub_(sample_max[:, None]).clamp_min_(_EXP_FLOOR).exp_()


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
        self.sinkhorn_workspace = SinkhornWorkspace()  # the training plan's (N, K) buffer, reused from step to step

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
        if self.training:
            if torch.compiler.is_compiling():  # tensor ops only, so a compiled graph does not break
                targets = self.targets(flat, codebook)
                distances = torch.cdist(flat, codebook)
                logits = distances * -self.distance_scale(flat, codebook, distances)
                loss = self.commitment_weight * nn.functional.cross_entropy(logits, targets)
                weights = gumbel_softmax(logits, self.gumbel_temperature, self.gumbel_hard)
                return weights @ codebook, loss, weights.detach().argmax(dim=1)
            # One fused pass, block by block: the loss and the Gumbel decoding share each block's logits, and the
            # targets are rebuilt there from the plan's potentials (no (N, K) targets; the plan's passes run in the
            # module's workspace). The logits' scale is the plan's own (global under sync), times logit_scale.
            plan = sinkhorn_plan_potentials(flat, codebook, self.epsilon, self.num_iters, self.normalization,
                                            process_group=self.sync_group(), workspace=self.sinkhorn_workspace)
            return _GumbelDecode.apply(flat, codebook, plan.code_potentials, plan.distance_scale,
                                       self.logit_scale * plan.distance_scale, self.commitment_weight,
                                       self.gumbel_temperature, self.gumbel_hard)
        # Block by block with its own backward: no (N, K) logits or softmax kept for backward.
        targets = self.targets(flat, codebook)
        scale = self.distance_scale(flat, codebook)
        loss = self.commitment_weight * distance_cross_entropy(flat, codebook, targets, scale=scale)
        token_ids = self.nearest(flat, codebook)  # the most likely code: argmax of the logits
        return nn.functional.embedding(token_ids, codebook), loss, token_ids
