"""Sinkhorn assignment of features to codes (OptVQ, paper Sec. 3.3 and Algorithm 1): a streaming, global engine.

The published algorithm, for features ``z`` (N, d) and codes ``c`` (K, d):

1. ``D[i, j] = ||z_i - c_j||_2`` (Euclidean, not squared).
2. Normalize ``D`` (``"all"``: subtract the mean of the whole matrix, divide by its standard deviation plus
   ``1e-6``, subtract the minimum; ``"dim"``: divide by ``sqrt(d)``; ``"none"``: leave it) into ``A``.
3. ``Q = exp(-epsilon * A)``, divided by (its total ``+ 1e-8``).
4. ``num_iters`` times: scale every code's column to total ``1/K``, then every row to total ``1/N`` (the reference
   code adds ``1e-8`` to each total before dividing).
5. ``token[i] = argmax_j Q[i, j]``.

This module runs the same recursion on scaling vectors in the log domain: the plan is always
``Q[i, j] = exp(-epsilon * A[i, j] + a[i] + b[j])`` and only the row potentials ``a`` (N) and the code potentials
``b`` (K) are stored. Every pass over the plan recomputes its entries block by block (from a cached distance matrix,
or from the features themselves in the streaming path), so no ``N x K`` plan is ever materialized. See
``docs/sinkhorn.md`` for the derivation, what is redundant, and how underflow is handled. In short:

* The result is the published algorithm's argmax wherever that algorithm is finite (same ``+1e-8`` guards, same
  order of normalizations), and the exact argmax of the untruncated plan where ``exp`` underflows.
* ``"all"``'s mean subtraction is a constant shift of the cost and cancels: only the minimum and the standard
  deviation of ``D`` are needed, gathered in one streaming pass.
* The last row normalization does not move any row's argmax and is skipped. ``num_iters=0`` is nearest neighbour.
* Under ``torch.distributed`` (``process_group``), the normalization statistics, the plan's total and its code
  totals are all-reduced, so every rank gets the assignment one process would compute on the concatenated batch.
* The plan carries no gradient: everything runs under ``torch.no_grad`` and never enters autograd.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

__all__ = [
    "sinkhorn_assign",
    "euclidean_argmin",
    "normalize_distances",
    "pairwise_euclidean",
    "VALID_NORMALIZATIONS",
    "DEFAULT_DENSE_LIMIT",
]

VALID_NORMALIZATIONS = ("all", "dim", "none")

#: ``streaming="auto"`` keeps one cached ``(N, K)`` float32 distance matrix up to this many entries (512 MiB) and
#: recomputes distances block by block above it.
DEFAULT_DENSE_LIMIT = 1 << 27

# Rows of distances are computed in chunks of about this many entries (64 MiB of float32: a matmul needs a few
# hundred rows to run at full speed) and processed in blocks of about _BLOCK_ENTRIES (4 MiB, cache-sized).
_CHUNK_ENTRIES = 1 << 24
_BLOCK_ENTRIES = 1 << 20
# Below this code dimension, distances are computed coordinate by coordinate (exact differences, no matmul).
_DIRECT_MAX_DIM = 4
# The reference implementation adds this to every total before dividing by it.
_REFERENCE_GUARD = 1e-8
_LOG_GUARD = math.log(_REFERENCE_GUARD)
# Scaling-vector (kernel) passes are used while the code potentials span at most _CODE_SPREAD nats and the row
# scales at most _ROW_SPREAD; kernel entries below _KERNEL_FLOOR (about e^-85 of their row's largest) are zeroed.
# Within these bounds nothing float32 drops can reach 1e-8 (the guards): see docs/sinkhorn.md.
_CODE_SPREAD = 30.0
_ROW_SPREAD = 60.0
_KERNEL_FLOOR = 1e-37
# The cost's scale is capped here: beyond it the plan is already one-hot on the nearest code in float32.
_MAX_COST_SCALE = 1e20


def pairwise_euclidean(features: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``(N, K)`` between the rows of ``features`` ``(N, d)`` and ``codebook`` ``(K, d)``.

    Dense (materializes ``N x K``); the engine itself never calls it.
    """
    return torch.cdist(features.unsqueeze(0), codebook.unsqueeze(0), p=2.0).squeeze(0)


def normalize_distances(distances: torch.Tensor, normalization: str = "all") -> torch.Tensor:
    """Normalize a distance matrix as the paper's Eqs. (11)-(12) (``"all"``), or not (``"none"``).

    ``"dim"`` needs the code dimension and is handled in :func:`sinkhorn_assign`, so this helper accepts ``"all"``
    and ``"none"``.
    """
    if normalization == "all":
        # Unbiased std as the reference (torch's default); a single entry has no spread.
        spread = distances.std() if distances.numel() > 1 else distances.new_zeros(())
        normalized = (distances - distances.mean()) / (spread + 1e-6)
        return normalized - normalized.min()
    if normalization == "none":
        return distances
    raise ValueError(f"`normalization` must be one of ('all', 'none') here, got {normalization!r}.")


def _validate_pair(features: torch.Tensor, codebook: torch.Tensor, name: str):
    if features.ndim != 2 or codebook.ndim != 2:
        raise ValueError(
            f"{name} expects features (N, d) and codebook (K, d), got {tuple(features.shape)} and "
            f"{tuple(codebook.shape)}."
        )
    if features.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"features and codebook must share their last dimension, got d={features.shape[1]} and "
            f"d={codebook.shape[1]}."
        )
    if codebook.shape[0] < 1:
        raise ValueError("The codebook must hold at least one code.")
    if not features.is_floating_point() or not codebook.is_floating_point():
        raise ValueError(f"features and codebook must be floating point, got {features.dtype} and {codebook.dtype}.")


def _validate(features, codebook, epsilon, num_iters, normalization, streaming, block_size):
    _validate_pair(features, codebook, "sinkhorn_assign")
    if normalization not in VALID_NORMALIZATIONS:
        raise ValueError(f"`normalization` must be one of {VALID_NORMALIZATIONS}, got {normalization!r}.")
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"`epsilon` must be a positive finite number, got {epsilon}.")
    if int(num_iters) != num_iters or num_iters < 0:
        raise ValueError(f"`num_iters` must be a non-negative integer, got {num_iters}.")
    if streaming not in ("auto", True, False):
        raise ValueError(f"`streaming` must be 'auto', True or False, got {streaming!r}.")
    if block_size is not None and (int(block_size) != block_size or block_size < 1):
        raise ValueError(f"`block_size` must be a positive integer or None, got {block_size}.")


# ----------------------------------------------------------------------------------------------------------------
# Collectives (no-ops without a process group)
# ----------------------------------------------------------------------------------------------------------------
def _all_reduce(tensor: torch.Tensor, op: str, group) -> torch.Tensor:
    if group is None:
        return tensor
    import torch.distributed as dist

    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    dist.all_reduce(tensor, op=reduce_op, group=group)
    return tensor


def _resolve_group(process_group):
    """``None`` -> local; a group (or ``"world"``) -> that group if it has more than one rank, else local."""
    if process_group is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if isinstance(process_group, str) and process_group == "world" else process_group
    return group if dist.get_world_size(group) > 1 else None


# ----------------------------------------------------------------------------------------------------------------
# Distances, block by block
# ----------------------------------------------------------------------------------------------------------------
class _Distances:
    """Centered, power-of-two-rescaled float32 operands, producing blocks of ``lambda * D`` (``lambda = 2^k``).

    Translating both sides by the codebook's mean and scaling them by a power of two change no distance ratio (the
    scale is exact in floating point); they keep ``||z||^2 + ||c||^2 - 2 z.c`` accurate far from the origin and
    keep its squares from overflowing (huge inputs) or underflowing (tiny ones).
    """

    def __init__(self, features: torch.Tensor, codebook: torch.Tensor, group):
        center = codebook.mean(dim=0)
        features = features - center
        codebook = codebook - center
        largest = torch.stack(
            [features.abs().amax() if features.numel() else features.new_zeros(()), codebook.abs().amax()]
        ).amax()
        largest = float(_all_reduce(largest.reshape(1), "max", group)[0])
        exponent = math.frexp(largest)[1] if largest > 0 and math.isfinite(largest) else 0
        self.scale = math.ldexp(1.0, -exponent)  # lambda: largest |entry| lands in [0.5, 1)
        self.features = features * self.scale
        self.codebook = codebook * self.scale
        self.direct = self.codebook.shape[1] <= _DIRECT_MAX_DIM
        self.feature_sq = self.features.square().sum(dim=1, keepdim=True)  # (N, 1)
        self.code_sq = self.codebook.square().sum(dim=1)  # (K,)
        self.codebook_t = self.codebook.t().contiguous()  # (d, K)
        if not self.direct:
            # [z, |z|^2, 1] . [-2c, 1, |c|^2] = |z - c|^2: one matmul, no broadcast passes.
            ones = self.features.new_ones(self.features.shape[0], 1)
            self.features_aug = torch.cat([self.features, self.feature_sq, ones], dim=1)
            self.codebook_aug_t = torch.cat(
                [-2.0 * self.codebook_t, torch.ones_like(self.code_sq)[None], self.code_sq[None]], dim=0
            )

    def squared_scores(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """``lambda^2 (D^2 - ||z||^2)`` for rows ``[start, stop)``: enough for an argmin (matmul path only)."""
        return torch.addmm(self.code_sq, self.features[start:stop], self.codebook_t, alpha=-2.0, out=out)

    def block(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """``lambda * D`` for rows ``[start, stop)``, written into ``out`` (shape ``(stop - start, K)``) if given."""
        rows = self.features[start:stop]
        if self.direct:
            if out is None:
                out = rows.new_empty(rows.shape[0], self.codebook.shape[0])
            torch.sub(rows[:, :1], self.codebook_t[:1], out=out).square_()
            for k in range(1, rows.shape[1]):
                out.add_(torch.sub(rows[:, k : k + 1], self.codebook_t[k : k + 1]).square_())
            return out.sqrt_()
        out = torch.mm(self.features_aug[start:stop], self.codebook_aug_t, out=out)
        return out.clamp_min_(0.0).sqrt_()


def _chunk_rows(num_codes: int, block_size: int | None) -> int:
    return int(block_size) if block_size is not None else max(1, _CHUNK_ENTRIES // num_codes)


@torch.no_grad()
def euclidean_argmin(features: torch.Tensor, codebook: torch.Tensor, block_size: int | None = None) -> torch.LongTensor:
    """Index of the Euclidean-nearest code of every row, computed block by block (memory ``O(block)``, not ``N x K``).

    Args:
        features (`torch.Tensor` of shape `(N, d)`): the vectors to assign.
        codebook (`torch.Tensor` of shape `(K, d)`): the codes.
        block_size (`int`, *optional*): rows per block; by default about ``2^24 / K`` (64 MiB of scores).

    Returns:
        `torch.LongTensor` of shape `(N,)`. Ties go to the lowest index.
    """
    _validate_pair(features, codebook, "euclidean_argmin")
    device = features.device
    num_rows = features.shape[0]
    if num_rows == 0 or codebook.shape[0] == 1:
        return torch.zeros(num_rows, dtype=torch.long, device=device)
    with _no_autocast(device):
        distances = _Distances(features.detach().float(), codebook.detach().float(), None)
        rows = _chunk_rows(codebook.shape[0], block_size)
        ids = torch.empty(num_rows, dtype=torch.long, device=device)
        buffer = None
        for start in range(0, num_rows, rows):
            stop = min(start + rows, num_rows)
            if buffer is None or buffer.shape[0] != stop - start:
                buffer = features.new_empty(stop - start, codebook.shape[0], dtype=torch.float32)
            # The matmul path skips ||z||^2 and the square root: neither moves a row's argmin.
            scores = distances.block(start, stop, out=buffer) if distances.direct else distances.squared_scores(
                start, stop, out=buffer
            )
            torch.argmin(scores, dim=1, out=ids[start:stop])
    return ids


def _no_autocast(device: torch.device):
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------------
class _Plan:
    """Walks the plan's rows: distance chunks of ``chunk_rows`` rows (one matmul each, cached or recomputed),
    split into cache-sized blocks of ``rows`` rows for the elementwise work."""

    def __init__(self, distances: _Distances, num_rows: int, chunk_rows: int, cache: bool):
        self.distances = distances
        self.num_rows = num_rows
        self.num_codes = distances.codebook.shape[0]
        self.chunk_rows = max(1, min(chunk_rows, num_rows))
        self.rows = max(1, min(self.chunk_rows, _BLOCK_ENTRIES // self.num_codes))
        self.cache = distances.features.new_empty(num_rows, self.num_codes) if cache and num_rows > 0 else None
        self.cached = False
        self._scratch = None

    def blocks(self):
        """Yield ``(start, stop, lambda * D[start:stop])`` over all rows; the view is valid until the next one."""
        for chunk_start in range(0, self.num_rows, self.chunk_rows):
            chunk_stop = min(chunk_start + self.chunk_rows, self.num_rows)
            if self.cache is not None:
                chunk = self.cache[chunk_start:chunk_stop]
                if not self.cached:
                    self.distances.block(chunk_start, chunk_stop, out=chunk)
            else:
                if self._scratch is None:
                    self._scratch = self.distances.features.new_empty(self.chunk_rows, self.num_codes)
                chunk = self.distances.block(chunk_start, chunk_stop, out=self._scratch[: chunk_stop - chunk_start])
            for start in range(chunk_start, chunk_stop, self.rows):
                stop = min(start + self.rows, chunk_stop)
                yield start, stop, chunk[start - chunk_start : stop - chunk_start]
        if self.cache is not None:
            self.cached = True


@torch.no_grad()
def sinkhorn_assign(
    features: torch.Tensor,
    codebook: torch.Tensor,
    epsilon: float = 10.0,
    num_iters: int = 5,
    normalization: str = "all",
    *,
    process_group=None,
    streaming: bool | str = "auto",
    block_size: int | None = None,
    dense_limit: int = DEFAULT_DENSE_LIMIT,
) -> torch.LongTensor:
    """Assign each feature to a code by entropic optimal transport (OptVQ's Sinkhorn assignment).

    Args:
        features (`torch.Tensor` of shape `(N, d)`):
            The vectors to quantize (one row per position and head). Any floating dtype; computed in float32.
        codebook (`torch.Tensor` of shape `(K, d)`):
            The codes in use (after any shared projection). Must be identical on every rank of `process_group`.
        epsilon (`float`, defaults to 10.0):
            Inverse temperature of the entropic plan, ``Q = exp(-epsilon * A)``.
        num_iters (`int`, defaults to 5):
            Number of (column, row) normalization rounds. ``0`` reduces to nearest-neighbour assignment.
        normalization (`str`, defaults to `"all"`):
            How the distance matrix is normalized before the exponential: `"all"` (paper Eqs. 11-12),
            `"dim"` (divide by ``sqrt(d)``) or `"none"`.
        process_group (`torch.distributed.ProcessGroup` or `"world"`, *optional*):
            If given (and `torch.distributed` is initialized with more than one rank in it), the rows of all ranks
            form one global batch: the normalization statistics (mean, std, min), the plan's total and its code
            totals are all-reduced, so each rank receives its own rows' share of the assignment one process would
            compute on the concatenated batch. Every rank of the group must call this function together (with any
            number of rows, including 0). `None` (default) assigns this process's rows alone.
        streaming (`bool` or `"auto"`, defaults to `"auto"`):
            `False` caches this rank's ``(N, K)`` float32 distance matrix (one plan-sized buffer, the fastest
            path); `True` never materializes it and recomputes distances block by block on every pass (memory
            ``O((N + K) d + block)``); `"auto"` streams when ``N * K > dense_limit``. Both give the same result.
        block_size (`int`, *optional*):
            Rows of distances computed at once (the streaming path's memory knob: ``block_size x K`` float32);
            by default about ``2^24 / K`` (64 MiB).
        dense_limit (`int`, defaults to `DEFAULT_DENSE_LIMIT` = 2^27):
            Largest ``N * K`` that `streaming="auto"` caches.

    Returns:
        `torch.LongTensor` of shape `(N,)`: the code index of every row.
    """
    _validate(features, codebook, epsilon, num_iters, normalization, streaming, block_size)
    group = _resolve_group(process_group)
    device = features.device
    num_rows, num_codes = features.shape[0], codebook.shape[0]
    if num_codes == 1:
        return torch.zeros(num_rows, dtype=torch.long, device=device)
    if num_iters == 0:
        # Any normalization is increasing in D, so the initial plan's argmax is the nearest code.
        return euclidean_argmin(features, codebook, block_size)
    if streaming == "auto":
        streaming = num_rows * num_codes > dense_limit
    with _no_autocast(device):
        return _sinkhorn(
            features.detach().float(),
            codebook.detach().float(),
            float(epsilon),
            int(num_iters),
            normalization,
            group,
            not streaming,
            _chunk_rows(num_codes, block_size),
        )


def _log_row_totals(logits: torch.Tensor):
    """``(softmax, logsumexp)`` of every row of a block of logits, with one fused softmax kernel.

    The softmax is exact for every row (its largest entry is ``1 / total >= 1 / K``), and
    ``logsumexp = max - log(largest softmax entry)``.
    """
    row_max = logits.amax(dim=1)
    probabilities = torch.softmax(logits, dim=1)
    # softmax's largest entry is exp(0) / total, so log(total) = -log(that entry).
    return probabilities, row_max - probabilities.amax(dim=1).log()


def _combine_moments(counts, means, squares):
    """Chan et al.'s combination of per-block (count, mean, sum of squared deviations), in float64."""
    total = counts.sum()
    if float(total) == 0:
        return total, total.new_zeros(()), total.new_zeros(())
    mean = (counts * means).sum() / total
    return total, mean, (squares + counts * (means - mean) ** 2).sum()


def _sinkhorn(features, codebook, epsilon, num_iters, normalization, group, cache, chunk_rows):
    device = features.device
    num_rows, dim = features.shape
    num_codes = codebook.shape[0]
    distances = _Distances(features, codebook, group)
    plan = _Plan(distances, num_rows, chunk_rows, cache)
    f64 = dict(dtype=torch.float64, device=device)

    total_rows = int(_all_reduce(torch.tensor([num_rows], **f64), "sum", group)[0].item())
    if total_rows == 0:
        return torch.zeros(0, dtype=torch.long, device=device)

    # ---- pass 0 (cached path or "all"): fill the cache, each row's minimum distance, the statistics ----------
    need_pass0 = plan.cache is not None or normalization == "all"
    row_min = torch.zeros(num_rows, dtype=torch.float32, device=device)
    if need_pass0:
        # Shifted sums around a pivot p = sqrt(E[D^2]) (closed form, this rank's rows): since |mean(D) - p| <=
        # std(D), there is no cancellation. Ranks combine by Chan et al.'s formula. The mean is a constant shift of
        # the cost and cancels: only the std and the minimum are used.
        pivot = 0.0
        if num_rows > 0 and normalization == "all":
            mean_sq = (
                distances.feature_sq.mean()
                + distances.code_sq.mean()
                - 2 * distances.features.mean(dim=0) @ distances.codebook.mean(dim=0)
            )
            pivot = math.sqrt(max(float(mean_sq), 0.0))
        first = torch.zeros(1, **f64)
        second = torch.zeros(1, **f64)
        for start, stop, block in plan.blocks():
            torch.amin(block, dim=1, out=row_min[start:stop])
            if normalization == "all":
                centered = (block - pivot).flatten()
                first += centered.sum().double()
                second += torch.dot(centered, centered).double()

    # ---- the cost's affine map: logits = -k * (lambda * D - shift) ------------------------------------------
    if normalization == "all":
        local_count = num_rows * num_codes
        counts = torch.tensor([local_count], **f64)
        means = pivot + first / max(local_count, 1)
        squares = second - first**2 / max(local_count, 1)
        count, mean, square = _combine_moments(counts, means, squares)
        if group is not None:
            global_mean = _all_reduce(torch.stack([count * mean, count]), "sum", group)
            global_mean = global_mean[0] / global_mean[1]
            square = _all_reduce((square + count * (mean - global_mean) ** 2).reshape(1), "sum", group)[0]
        minimum = row_min.amin().reshape(1) if num_rows > 0 else torch.full((1,), math.inf, device=device)
        minimum = _all_reduce(minimum, "min", group)
        entries = total_rows * num_codes
        spread = math.sqrt(max(float(square), 0.0) / (entries - 1)) if entries > 1 else 0.0  # std of lambda * D
        # A = (D - min D) / (std D + 1e-6) = (lambda D - lambda min D) / (std(lambda D) + 1e-6 lambda)
        cost_scale = epsilon / (spread + 1e-6 * distances.scale)
        shift = float(minimum[0])
    else:
        divisor = math.sqrt(dim) if normalization == "dim" else 1.0
        cost_scale = epsilon / (distances.scale * divisor)
        shift = 0.0
    cost_scale = min(cost_scale, _MAX_COST_SCALE)
    log_rows, log_codes = math.log(total_rows), math.log(num_codes)
    guard = torch.tensor(_LOG_GUARD, **f64)

    # ---- cached path: turn the cache into the row-stabilized kernel G = exp(logits - row max) -----------------
    # Every pass then is a matrix-vector product on G (scaling-vector Sinkhorn); the exact log-domain pass below
    # remains the fallback whenever the potentials spread too far for float32 scaling vectors (see docs).
    kernel = plan.cache is not None
    row_logit_max = (row_min.double() - shift) * (-cost_scale)  # max_j logits[i, j]
    if kernel:
        for start, stop, block in plan.blocks():
            block.sub_(row_min[start:stop, None]).mul_(-cost_scale).exp_()
            torch.threshold_(block, _KERNEL_FLOOR, 0.0)  # no subnormals: < e^-85 of the row's largest entry

    def logit_blocks(code_potentials):
        """Yield ``(start, stop, b[j] + logits[i, j])`` in float32, from distances or from the kernel."""
        if kernel:
            shifted = code_potentials.float()
            for start, stop, block in plan.blocks():
                yield start, stop, torch.log(block).add_(row_logit_max[start:stop, None].float()).add_(shifted)
        else:
            offset = (code_potentials + cost_scale * shift).float()
            for start, stop, block in plan.blocks():
                # b[j] - k * (lambda D[i, j] - shift); the offset carries + k * shift.
                yield start, stop, torch.add(offset, block, alpha=-cost_scale)

    def log_domain_columns(code_potentials, row_potentials, update_rows):
        """One exact log-domain pass: optionally the row normalization, then the (local) code totals."""
        column = torch.zeros(num_codes, **f64)
        for start, stop, block in logit_blocks(code_potentials):
            probabilities, log_totals = _log_row_totals(block)
            if update_rows:
                log_row_total = row_potentials[start:stop] + log_totals.double()
                row_potentials[start:stop] -= torch.logaddexp(log_row_total, guard) + log_rows
            # each row's total, spread over its codes by the softmax
            weights = torch.exp(row_potentials[start:stop] + log_totals.double()).float()
            column += (probabilities.t() @ weights).double()
        return column

    def kernel_columns(row_scale):
        """Code totals ``sum_i G[i, j] exp(row_scale[i])`` (without the codes' own scale) if float32 holds them."""
        if num_rows == 0:
            return torch.zeros(num_codes, **f64)
        top = row_scale.max()
        if float(top - row_scale.min()) > _ROW_SPREAD:
            return None
        weights = torch.exp(row_scale - top).float()
        return (plan.cache.t() @ weights).double() * torch.exp(top)

    # ---- pass 1: the initial plan's total and code totals ------------------------------------------------------
    column = kernel_columns(row_logit_max) if kernel else None
    if column is not None:
        running_max = float(row_logit_max.max()) if num_rows > 0 else -math.inf
        total = (plan.cache.sum(dim=1).double() * torch.exp(row_logit_max - running_max)).sum() if num_rows else (
            torch.zeros((), **f64)
        )
        column = column * math.exp(-running_max) if num_rows > 0 else column
    else:
        column = torch.zeros(num_codes, **f64)
        total = torch.zeros((), **f64)
        running_max = -math.inf
        for _, _, block in logit_blocks(torch.zeros(num_codes, **f64)):
            probabilities, log_totals = _log_row_totals(block)
            block_max = float(log_totals.max())
            if block_max > running_max:  # a running maximum keeps exp in range (an online softmax)
                if running_max > -math.inf:
                    factor = math.exp(running_max - block_max)
                    column *= factor
                    total *= factor
                running_max = block_max
            weights = torch.exp(log_totals - running_max)
            total += weights.sum(dtype=torch.float64)
            column += (probabilities.t() @ weights).double()
    if group is not None:
        global_max = _all_reduce(torch.tensor([running_max], **f64), "max", group)
        factor = torch.exp(torch.tensor(running_max, **f64) - global_max) if num_rows > 0 else global_max.new_zeros(1)
        packed = _all_reduce(torch.cat([column, total.reshape(1)]) * factor, "sum", group)
        column, total, running_max = packed[:-1], packed[-1], float(global_max[0])
    # Q / (sum(Q) + 1e-8): the same row potential for every row.
    log_total = torch.log(total) + running_max
    initial_row = -torch.logaddexp(log_total, guard)
    log_columns = torch.log(column) + running_max + initial_row
    row_potentials = initial_row.expand(num_rows).clone()
    code_potentials = torch.zeros(num_codes, **f64)

    # ---- iterations: code update, then one fused pass (row update + the next code totals) --------------------
    for iteration in range(num_iters):
        code_potentials -= torch.logaddexp(log_columns, guard) + log_codes
        if iteration == num_iters - 1:
            break  # the last row normalization does not move any row's argmax
        code_top = code_potentials.max()
        column = None
        if kernel and float(code_top - code_potentials.min()) <= _CODE_SPREAD:
            if num_rows > 0:
                # row totals: sum_j G[i, j] exp(b[j]); every row's largest entry keeps its sum >= exp(-spread)
                sums = plan.cache @ torch.exp(code_potentials - code_top).float()
                log_row_total = row_potentials + row_logit_max + code_top + sums.double().log()
                row_potentials -= torch.logaddexp(log_row_total, guard) + log_rows
            column = kernel_columns(row_potentials + row_logit_max)
            if column is None:
                column = log_domain_columns(code_potentials, row_potentials, update_rows=False)
            else:
                column = column * torch.exp(code_potentials)
        else:
            column = log_domain_columns(code_potentials, row_potentials, update_rows=True)
        column = _all_reduce(column, "sum", group)
        log_columns = torch.log(column)

    # ---- assignment: argmax_j of the log plan (row potentials do not move it) --------------------------------
    ids = torch.empty(num_rows, dtype=torch.long, device=device)
    code_top = code_potentials.max()
    if kernel and float(code_top - code_potentials.min()) <= _CODE_SPREAD:
        scale = torch.exp(code_potentials - code_top).float()
        for start, stop, block in plan.blocks():
            torch.argmax(block * scale, dim=1, out=ids[start:stop])
    else:
        for start, stop, block in logit_blocks(code_potentials):
            torch.argmax(block, dim=1, out=ids[start:stop])
    return ids


@torch.no_grad()
def sinkhorn_log_plan(cost: torch.Tensor, epsilon: float, num_iters: int) -> torch.Tensor:
    """Dense log of the Sinkhorn plan's columns scaled for the argmax (a small, readable reference).

    ``cost`` ``(N, K)`` must already be normalized. Rows are left unscaled (a row's scale does not move its argmax);
    follows the reference's order (columns, then rows) and its ``+1e-8`` guards, in log space.
    """
    num_rows, num_codes = cost.shape
    log_plan = cost * (-epsilon)
    guard = torch.tensor(_LOG_GUARD, dtype=log_plan.dtype, device=log_plan.device)
    log_plan = log_plan - torch.logaddexp(torch.logsumexp(log_plan.flatten(), 0), guard)
    log_num_rows, log_num_codes = math.log(num_rows), math.log(num_codes)
    for iteration in range(num_iters):
        column_totals = torch.logsumexp(log_plan, dim=0, keepdim=True)
        log_plan = log_plan - (torch.logaddexp(column_totals, guard) + log_num_codes)
        if iteration == num_iters - 1:
            break
        row_totals = torch.logsumexp(log_plan, dim=1, keepdim=True)
        log_plan = log_plan - (torch.logaddexp(row_totals, guard) + log_num_rows)
    return log_plan


def _dense_squared_distances(features: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    squared = (features * features).sum(1, keepdim=True) - 2 * features @ codebook.t() + (codebook * codebook).sum(1)
    return squared.clamp_min(0.0)


@torch.no_grad()
def dense_nearest_assign(features: torch.Tensor, codebook: torch.Tensor) -> torch.LongTensor:
    """Nearest code by one distance matmul and an argmin: tensor ops only, traceable by `torch.compile`."""
    features, codebook = features.detach().float(), codebook.detach().float()
    scores = (codebook * codebook).sum(1) - 2 * features @ codebook.t()
    return scores.argmin(dim=1)


@torch.no_grad()
def dense_sinkhorn_assign(
    features: torch.Tensor,
    codebook: torch.Tensor,
    epsilon: float = 10.0,
    num_iters: int = 5,
    normalization: str = "all",
) -> torch.LongTensor:
    """Single-process Sinkhorn assignment with tensor ops only (no host synchronization), for `torch.compile`.

    Same algorithm and guards as :func:`sinkhorn_assign`, on a materialized ``N x K`` matrix: the quantizer uses it
    while being compiled, where the engine's data-dependent block scheduling would break the graph.
    """
    features, codebook = features.detach().float(), codebook.detach().float()
    distances = _dense_squared_distances(features, codebook).sqrt()
    if normalization == "dim":
        cost = distances / math.sqrt(codebook.shape[1])
    else:
        cost = normalize_distances(distances, normalization)
    cost = torch.nan_to_num(cost, nan=0.0, posinf=_MAX_COST_SCALE, neginf=0.0)
    return sinkhorn_log_plan(cost, float(epsilon), int(num_iters)).argmax(dim=1)
