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
import threading
from contextlib import nullcontext
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "sinkhorn_assign",
    "SinkhornWorkspace",
    "euclidean_argmin",
    "normalize_distances",
    "pairwise_euclidean",
    "sinkhorn_plan",
    "sinkhorn_plan_potentials",
    "PlanPotentials",
    "set_block_policy",
    "get_block_policy",
    "BLOCK_POLICIES",
    "VALID_NORMALIZATIONS",
    "DEFAULT_DENSE_LIMIT",
]

VALID_NORMALIZATIONS = ("all", "dim", "none")

#: ``streaming="auto"`` keeps one cached ``(N, K)`` float32 distance matrix up to this many entries (1 GiB) and
#: recomputes distances block by block above it.
DEFAULT_DENSE_LIMIT = 1 << 28

# Rows of distances are computed in chunks of about this many entries (64 MiB of float32: a matmul needs a few
# hundred rows to run at full speed) and processed in blocks of about _block_entries() entries. On CPU the block size
# trades cache locality against the number of parallel ops, each of which ends in an OpenMP barrier: when another
# process competes for the cores, a barrier with spinning threads (OpenMP's default) can cost a scheduler slice, and
# 16 MiB blocks were 2.3x slower than 64 MiB ones at both benchmark shapes; with passive OpenMP threads
# (OMP_WAIT_POLICY=PASSIVE) 16 MiB blocks were 10-15% faster idle and as fast under contention (docs/benchmarks.md).
# Which applies is the block policy (set_block_policy). On accelerators every block costs kernel launches: 256 MiB.
_CHUNK_ENTRIES = 1 << 24
_BLOCK_ENTRIES = 1 << 24
_PASSIVE_BLOCK_ENTRIES = 1 << 22
_ACCELERATOR_BLOCK_ENTRIES = 1 << 26
# Below this code dimension, distances are computed coordinate by coordinate (exact differences, no matmul).
_DIRECT_MAX_DIM = 4
# The reference implementation adds this to every total before dividing by it.
_REFERENCE_GUARD = 1e-8
_LOG_GUARD = math.log(_REFERENCE_GUARD)
# The cached path keeps each row of its kernel scaled so that its largest entry is e^sigma, with sigma as large as
# float32 allows for a block's sums (below e^_FLOAT32_LOG_MAX; sigma is about 76 at K = 16,384): float32 then holds
# entries down to about e^-(sigma + 87) of their row's largest. exp is never asked for anything below _EXP_FLOOR
# (torch's CPU exp takes a very slow path there; such entries are far below float32 resolution of any total they
# enter). The kernel is rebuilt once the code potentials moved by more than _CODE_SPREAD nats since it was built.
# See docs/sinkhorn.md.
_FLOAT32_LOG_MAX = 87.0
_EXP_FLOOR = -87.0
_CODE_SPREAD = 60.0
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
        return _normalize_all(distances, 1e-6)
    if normalization == "none":
        return distances
    raise ValueError(f"`normalization` must be one of ('all', 'none') here, got {normalization!r}.")


def _normalize_all(distances: torch.Tensor, guard) -> torch.Tensor:
    """``(D - mean D) / (std D + guard) - min``; ``guard`` is 1e-6 in the distances' units (a tensor or a float)."""
    # Unbiased std as the reference (torch's default); a single entry has no spread.
    spread = distances.std() if distances.numel() > 1 else distances.new_zeros(())
    normalized = (distances - distances.mean()) / (spread + guard)
    return normalized - normalized.min()


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
    if features.shape[1] < 1:
        raise ValueError(f"{name} needs features with at least one channel, got shape {tuple(features.shape)}.")
    if not features.is_floating_point() or not codebook.is_floating_point():
        raise ValueError(f"features and codebook must be floating point, got {features.dtype} and {codebook.dtype}.")


def _validate(features, codebook, epsilon, num_iters, normalization, streaming, block_size, workspace, block_policy,
              name="sinkhorn_assign"):
    _validate_pair(features, codebook, name)
    if block_policy is not None:
        _check_block_policy(block_policy)
    if workspace is not None and not isinstance(workspace, SinkhornWorkspace):
        raise ValueError(f"`workspace` must be a SinkhornWorkspace or None, got {type(workspace).__name__}.")
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

    def __init__(self, features: torch.Tensor, codebook: torch.Tensor, group, name: str = "sinkhorn_assign"):
        center = codebook.mean(dim=0)
        features = features - center
        codebook = codebook - center
        largest = float(_all_reduce(_largest_magnitude(features, codebook).reshape(1), "max", group)[0])
        if not math.isfinite(largest):  # read back anyway: the finiteness check costs no extra synchronization
            raise ValueError(
                f"{name}: the features or the codebook contain NaN or Inf values (or float32 values so large, near "
                f"3.4e38, that their differences overflow: rescale them)."
            )
        exponent = math.frexp(largest)[1] if largest > 0 else 0
        self.scale = math.ldexp(1.0, -exponent)  # lambda: largest |entry| lands in [0.5, 1)
        self.features = features * self.scale
        self.codebook = codebook * self.scale
        self.direct = self.codebook.shape[1] <= _DIRECT_MAX_DIM
        self._scratch = None  # the direct path's coordinate differences
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
        if out is None:
            out = rows.new_empty(rows.shape[0], self.codebook.shape[0])
        if self.direct:
            torch.sub(rows[:, :1], self.codebook_t[:1], out=out).square_()
            if rows.shape[1] > 1:
                if self._scratch is None or self._scratch.numel() < out.numel():
                    self._scratch = out.new_empty(out.numel())
                difference = self._scratch[: out.numel()].view_as(out)
                for k in range(1, rows.shape[1]):
                    torch.sub(rows[:, k : k + 1], self.codebook_t[k : k + 1], out=difference)
                    out.addcmul_(difference, difference)
            return out.sqrt_()
        torch.mm(self.features_aug[start:stop], self.codebook_aug_t, out=out)
        return out.clamp_min_(0.0).sqrt_()


def _largest_magnitude(features: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The largest ``|entry|`` of both operands (NaN if any entry is NaN), a 0-d tensor."""
    parts = [part.abs().amax() for part in (features, codebook) if part.numel()]
    return torch.stack(parts).amax() if parts else features.new_zeros(())


#: Magnitudes beyond which wider-than-float32 operands are rescaled (by a power of two, exactly) before the cast.
_FLOAT32_SAFE_RANGE = (2.0**-60, 2.0**60)


def _float32_operands(features: torch.Tensor, codebook: torch.Tensor, group, normalization: str | None, name: str):
    """The operands in float32, without gradient. float64 operands whose magnitudes lie outside float32's range are
    first rescaled by one power of two in float64 (exact, and the same on every rank of `group`), which moves no
    nearest code and no `"all"`-normalized plan; for the other normalizations the distances' scale matters, so such
    inputs raise a `ValueError`. Non-finite float64 operands raise here (float32 ones in `_Distances`)."""
    features, codebook = features.detach(), codebook.detach()
    if torch.float64 not in (features.dtype, codebook.dtype):
        return features.float(), codebook.float()
    largest = _largest_magnitude(features.double(), codebook.double())
    largest = float(_all_reduce(largest.reshape(1), "max", group)[0])
    if not math.isfinite(largest):
        raise ValueError(f"{name}: the features or the codebook contain NaN or Inf values.")
    low, high = _FLOAT32_SAFE_RANGE
    if largest > 0 and not low <= largest <= high:
        if normalization not in (None, "all"):
            raise ValueError(
                f"{name}: float64 inputs of magnitude {largest:.3g} lie outside float32's range; with normalization="
                f"{normalization!r} the distances' scale matters, so rescale them yourself (or use 'all')."
            )
        scale = math.ldexp(1.0, -math.frexp(largest)[1])
        features, codebook = features.double() * scale, codebook.double() * scale
    return features.float(), codebook.float()


# ----------------------------------------------------------------------------------------------------------------
# Block policy
# ----------------------------------------------------------------------------------------------------------------
BLOCK_POLICIES = ("active", "passive")
_block_policy = "active"


def set_block_policy(policy: str):
    """Set how the engine sizes its CPU blocks for the rest of the process (each call may override it).

    Args:
        policy (`str`): how this process's OpenMP threads wait, which decides the best block size on CPU:
            `"active"` (the default, OpenMP's own default of spinning threads: 64 MiB blocks, fewer barriers) or
            `"passive"` (threads that sleep, as with `OMP_WAIT_POLICY=PASSIVE`: 16 MiB blocks, which stay in the
            last-level cache). Set `"passive"` together with `OMP_WAIT_POLICY=PASSIVE`; accelerators ignore it.
    """
    global _block_policy
    _block_policy = _check_block_policy(policy)


def get_block_policy() -> str:
    """The block policy in effect (see [`set_block_policy`])."""
    return _block_policy


def _check_block_policy(policy: str) -> str:
    if policy not in BLOCK_POLICIES:
        raise ValueError(f"`block_policy` must be one of {BLOCK_POLICIES}, got {policy!r}.")
    return policy


def _block_entries(device: torch.device, policy: str | None = None) -> int:
    if device.type != "cpu":
        return _ACCELERATOR_BLOCK_ENTRIES
    policy = _block_policy if policy is None else policy
    return _PASSIVE_BLOCK_ENTRIES if policy == "passive" else _BLOCK_ENTRIES


def _chunk_rows(num_codes: int, block_size: int | None) -> int:
    return int(block_size) if block_size is not None else max(1, _CHUNK_ENTRIES // num_codes)


def _first_extreme_per_row(block: torch.Tensor, out: torch.Tensor, largest: bool = True) -> torch.Tensor:
    """``torch.argmax(block, dim=1, out=out)`` (``argmin`` if not ``largest``): the first largest (smallest) entry of
    every row of a 2-D block.

    On CPU, numpy's SIMD kernels find it about 5x faster than torch's (0.44 vs 2.7 ms for a 4096 x 1024 float32
    block on one core); both return the first extreme entry, so the ids are the same. Other devices, dtypes and
    layouts use torch.
    """
    if (
        block.device.type == "cpu"
        and block.dtype == torch.float32
        and block.ndim == 2
        and block.stride(1) == 1
        and out.dtype == torch.long
        and out.is_contiguous()
        and not block.requires_grad
    ):
        (np.argmax if largest else np.argmin)(block.numpy(), axis=1, out=out.numpy())
        return out
    return torch.argmax(block, dim=1, out=out) if largest else torch.argmin(block, dim=1, out=out)


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
        distances = _Distances(*_float32_operands(features, codebook, None, None, "euclidean_argmin"), None,
                               "euclidean_argmin")
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
            _first_extreme_per_row(scores, ids[start:stop], largest=False)
    return ids


def _no_autocast(device: torch.device):
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------------
class SinkhornWorkspace:
    """A plan-sized float32 buffer that :func:`sinkhorn_assign`'s cached path reuses from call to call.

    A fresh ``N x K`` allocation is paid for again on every call: on CPU the first write to each of its pages costs
    about as much as the distance matmul itself (CUDA's caching allocator already avoids this). Pass the same
    workspace to every call to keep one buffer instead; it grows to the largest ``N * K`` seen and is freed with
    :meth:`release` or with the workspace. Each thread gets its own buffer, so a module shared by threads (serving,
    `nn.DataParallel` replicas) never races on it. It is never copied (``copy.deepcopy`` and pickling give an empty
    one), so an EMA copy or a checkpoint of a module holding one costs nothing. `OptVQQuantizer` keeps one.
    """

    def __init__(self):
        self._local = threading.local()

    @property
    def buffer(self) -> torch.Tensor | None:
        """This thread's buffer (flat float32), or `None` before the first cached call."""
        return getattr(self._local, "buffer", None)

    def get(self, num_rows: int, num_codes: int, device: torch.device) -> torch.Tensor:
        """A float32 ``(num_rows, num_codes)`` view of this thread's buffer (reallocated if too small or elsewhere)."""
        needed = num_rows * num_codes
        buffer = self.buffer
        if buffer is None or buffer.device != torch.device(device) or buffer.numel() < needed:
            self._local.buffer = None  # free the old one first
            buffer = self._local.buffer = torch.empty(needed, dtype=torch.float32, device=device)
        return buffer[:needed].view(num_rows, num_codes)

    def release(self):
        """Free this thread's buffer (the next call allocates again)."""
        self._local.buffer = None

    def __deepcopy__(self, memo):
        return SinkhornWorkspace()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._local = threading.local()

    def __repr__(self) -> str:
        size = 0 if self.buffer is None else self.buffer.numel() * 4
        return f"SinkhornWorkspace({size / 2**20:.0f} MiB)"


class _Plan:
    """Walks the plan's rows: distance chunks of ``chunk_rows`` rows (one matmul each, cached or recomputed),
    split into cache-sized blocks of ``rows`` rows for the elementwise work."""

    def __init__(
        self, distances: _Distances, num_rows: int, chunk_rows: int, cache: bool, block_entries: int, workspace=None
    ):
        self.distances = distances
        self.num_rows = num_rows
        self.num_codes = distances.codebook.shape[0]
        self.chunk_rows = max(1, min(chunk_rows, num_rows))
        if not cache and distances.features.device.type == "cpu":
            # a streamed pass allocates its logits per block: below glibc's mmap threshold they reuse heap memory
            block_entries = min(block_entries, _PASSIVE_BLOCK_ENTRIES)
        self.rows = max(1, min(self.chunk_rows, block_entries // self.num_codes))
        if distances.direct:  # no matmul to keep busy: compute distances block by block
            self.chunk_rows = self.rows
        self.cache = None
        if cache and num_rows > 0:
            device = distances.features.device
            self.cache = (
                workspace.get(num_rows, self.num_codes, device)
                if workspace is not None
                else distances.features.new_empty(num_rows, self.num_codes)
            )
        self.cached = False
        self._scratch = None

    def blocks(self):
        """Yield ``(start, stop, values)`` over all rows, ``values`` being ``lambda * D[start:stop]`` (or, in the cached
        path, whatever the passes left there). A streamed view is valid until the next one."""
        if self.cache is not None:
            # each block's distances are computed in place, where the rest of pass 0 finds them still in cache
            for start in range(0, self.num_rows, self.rows):
                stop = min(start + self.rows, self.num_rows)
                block = self.cache[start:stop]
                if not self.cached:
                    self.distances.block(start, stop, out=block)
                yield start, stop, block
            self.cached = True
            return
        for chunk_start in range(0, self.num_rows, self.chunk_rows):
            chunk_stop = min(chunk_start + self.chunk_rows, self.num_rows)
            if self._scratch is None:
                self._scratch = self.distances.features.new_empty(self.chunk_rows, self.num_codes)
            chunk = self.distances.block(chunk_start, chunk_stop, out=self._scratch[: chunk_stop - chunk_start])
            for start in range(chunk_start, chunk_stop, self.rows):
                stop = min(start + self.rows, chunk_stop)
                yield start, stop, chunk[start - chunk_start : stop - chunk_start]


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
    workspace: SinkhornWorkspace | None = None,
    block_policy: str | None = None,
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
        dense_limit (`int`, defaults to `DEFAULT_DENSE_LIMIT` = 2^28):
            Largest ``N * K`` that `streaming="auto"` caches (2^28 float32 entries: a 1 GiB cache).
        workspace ([`SinkhornWorkspace`], *optional*):
            Where the cached path keeps its ``(N, K)`` buffer, reused across calls (saves a plan-sized allocation
            and its page faults per call). By default the buffer is allocated per call and freed on return.
        block_policy (`str`, *optional*):
            `"active"` or `"passive"`: how CPU blocks are sized (see [`set_block_policy`]); by default the
            process-wide setting.

    Returns:
        `torch.LongTensor` of shape `(N,)`: the code index of every row.
    """
    _validate(features, codebook, epsilon, num_iters, normalization, streaming, block_size, workspace, block_policy)
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
    return _sinkhorn(features, codebook, epsilon, num_iters, normalization, group, not streaming, block_size,
                     block_policy, workspace)


@torch.no_grad()
def sinkhorn_plan(features: torch.Tensor, codebook: torch.Tensor, epsilon: float = 10.0, num_iters: int = 5,
                  normalization: str = "all", *, process_group=None, marginal_guard: float = 0.0,
                  block_size: int | None = None, block_policy: str | None = None) -> torch.Tensor:
    """Soft assignment by entropic optimal transport: the Sinkhorn plan's rows, each rescaled to sum to 1.

    The same engine and recursion as [`sinkhorn_assign`] (distances, normalization, ``num_iters`` rounds of code
    then row normalization), returning the plan instead of its row-wise argmax: OT-VAE's equipartition targets.
    The ``(N, K)`` result is the only plan-sized allocation; the passes run on it in place, block by block.

    Args:
        features (`torch.Tensor` of shape `(N, d)`), codebook (`torch.Tensor` of shape `(K, d)`), epsilon (`float`),
        num_iters (`int`), normalization (`str`), process_group, block_size, block_policy:
            as for [`sinkhorn_assign`]. With a `process_group`, the plan covers the concatenated batch of all ranks
            (global statistics, total and code totals) and each rank receives its own rows.
        marginal_guard (`float`, defaults to 0.0):
            Added to every total before dividing by it. `0` gives exact equipartition (every code receives mass
            `N / K`, however far it lies); `1e-8` reproduces the published algorithm's guards, whose row-wise argmax
            is [`sinkhorn_assign`]'s assignment.

    Returns:
        `torch.FloatTensor` of shape `(N, K)`, float32, rows summing to 1, without gradient.
    """
    _validate(features, codebook, epsilon, num_iters, normalization, False, block_size, None, block_policy,
              name="sinkhorn_plan")
    if not (marginal_guard >= 0 and math.isfinite(marginal_guard)):
        raise ValueError(f"`marginal_guard` must be a finite number >= 0, got {marginal_guard}.")
    group = _resolve_group(process_group)
    device = features.device
    num_rows, num_codes = features.shape[0], codebook.shape[0]
    if num_codes == 1:
        return torch.ones(num_rows, 1, dtype=torch.float32, device=device)
    log_guard = math.log(marginal_guard) if marginal_guard > 0 else -math.inf
    return _sinkhorn(features, codebook, epsilon, num_iters, normalization, group, True, block_size, block_policy,
                     None, soft=True, log_guard=log_guard)


class PlanPotentials(NamedTuple):
    """The soft Sinkhorn plan in closed form: row ``i`` of [`sinkhorn_plan`]'s result is
    ``softmax_j(-distance_scale * ||z_i - c_j|| + code_potentials[j])``.

    Attributes:
        distance_scale (`float`): the factor of the Euclidean distances in the plan's logits (for `"all"`,
            ``epsilon / (std(D) + 1e-6)`` with the standard deviation over the whole, possibly global, batch).
        code_potentials (`torch.DoubleTensor` of shape `(K,)`): the code potentials after the last code
            normalization (a constant added to all of them changes no row).
    """

    distance_scale: float
    code_potentials: torch.Tensor


@torch.no_grad()
def sinkhorn_plan_potentials(features: torch.Tensor, codebook: torch.Tensor, epsilon: float = 10.0,
                             num_iters: int = 5, normalization: str = "all", *, process_group=None,
                             marginal_guard: float = 0.0, block_size: int | None = None,
                             block_policy: str | None = None,
                             workspace: SinkhornWorkspace | None = None) -> PlanPotentials:
    """[`sinkhorn_plan`] without its ``(N, K)`` result: the scale and code potentials that give every row of it.

    The same passes as [`sinkhorn_plan`] except the last one (which writes the normalized rows): a caller that
    walks the distances block by block anyway (OT-VAE's training pass) rebuilds any block of the plan as
    ``softmax_j(-distance_scale * D[i, j] + code_potentials[j])``, so no plan-sized tensor outlives the call, and
    its working buffer can be a reused [`SinkhornWorkspace`].

    Args:
        features, codebook, epsilon, num_iters, normalization, process_group, marginal_guard, block_size,
        block_policy: as for [`sinkhorn_plan`].
        workspace ([`SinkhornWorkspace`], *optional*): where the passes keep their ``(N, K)`` buffer, reused
            across calls (as for [`sinkhorn_assign`]).

    Returns:
        [`PlanPotentials`].
    """
    _validate(features, codebook, epsilon, num_iters, normalization, False, block_size, workspace, block_policy,
              name="sinkhorn_plan_potentials")
    if not (marginal_guard >= 0 and math.isfinite(marginal_guard)):
        raise ValueError(f"`marginal_guard` must be a finite number >= 0, got {marginal_guard}.")
    group = _resolve_group(process_group)
    if codebook.shape[0] == 1:  # one code: every row is [1] whatever the scale
        return PlanPotentials(0.0, torch.zeros(1, dtype=torch.float64, device=features.device))
    log_guard = math.log(marginal_guard) if marginal_guard > 0 else -math.inf
    return _sinkhorn(features, codebook, epsilon, num_iters, normalization, group, True, block_size, block_policy,
                     workspace, soft="potentials", log_guard=log_guard)


def _log_row_totals(logits: torch.Tensor):
    """``(softmax, logsumexp)`` of every row of a block of logits (modified in place), one fused softmax kernel.

    Entries more than ``-_EXP_FLOOR`` nats below their row's largest are first raised to that bound (``exp`` of
    anything lower is far below float32 resolution of the row's total, and takes ``exp``'s slow path on CPU). The
    softmax is exact for every row (its largest entry is ``1 / total >= 1 / K``), and
    ``logsumexp = max - log(largest softmax entry)``.
    """
    row_max = logits.amax(dim=1)
    torch.maximum(logits, (row_max + _EXP_FLOOR)[:, None], out=logits)
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


def _reduce_scaled(values: torch.Tensor, log_scale: float, group):
    """All-reduce (sum) ``values * exp(log_scale)`` over ranks whose scales differ: returns ``(sum, common scale)``."""
    if group is None:
        return values, log_scale
    top = _all_reduce(torch.tensor([log_scale], dtype=torch.float64, device=values.device), "max", group)
    common = float(top[0])
    factor = math.exp(log_scale - common) if log_scale > -math.inf else 0.0
    return _all_reduce(values * factor, "sum", group), common


def _cost_map(distances, plan, normalization, epsilon, group, total_rows):
    """Pass 0 and the cost's affine map: returns ``(cost_scale, shift, row_min, pivot)``.

    The logits are ``-cost_scale * (lambda * D - shift)``; ``shift`` is the global minimum of ``lambda * D`` where pass
    0 runs (always when caching, for ``"all"`` when streaming) and 0 otherwise (a constant shift cancels). Pass 0
    subtracts ``pivot`` from every block in place, so the cache holds ``lambda * D - pivot`` from then on, and
    ``row_min`` (float32, ``None`` without pass 0) holds each row's smallest ``lambda * D - pivot``.
    """
    device = distances.features.device
    num_rows, dim = distances.features.shape
    num_codes = plan.num_codes
    f64 = dict(dtype=torch.float64, device=device)
    # "dim" and "none" have a fixed scale and no shift (the first normalization's guard sees the unshifted total)
    fixed_scale = epsilon / (distances.scale * (math.sqrt(dim) if normalization == "dim" else 1.0))
    if plan.cache is None and normalization != "all":
        return min(fixed_scale, _MAX_COST_SCALE), 0.0, None, 0.0

    # Shifted sums around a pivot p = sqrt(E[D^2]) (closed form, this rank's rows): since |mean(D) - p| <= std(D),
    # there is no cancellation. Ranks combine by Chan et al.'s formula. The mean is a constant shift of the cost and
    # cancels: only the std and the minimum are used.
    pivot = 0.0
    if num_rows > 0 and normalization == "all":
        mean_sq = (
            distances.feature_sq.mean()
            + distances.code_sq.mean()
            - 2 * distances.features.mean(dim=0) @ distances.codebook.mean(dim=0)
        )
        pivot = math.sqrt(max(float(mean_sq), 0.0))
    first = torch.zeros((), **f64)
    second = torch.zeros((), **f64)
    row_min = torch.zeros(num_rows, dtype=torch.float32, device=device)
    for start, stop, block in plan.blocks():
        if pivot:
            block.sub_(pivot)  # the cache keeps x - p; a streamed block is recomputed on the next pass anyway
        torch.amin(block, dim=1, out=row_min[start:stop])
        if normalization == "all":
            flat = block.flatten()
            first += flat.sum().double()
            second += torch.dot(flat, flat).double()
    if normalization != "all":
        return min(fixed_scale, _MAX_COST_SCALE), 0.0, row_min, pivot
    # in float64, every rank's row minima in the same (uncentered) coordinates
    minimum = row_min.amin().double().reshape(1) + pivot if num_rows > 0 else torch.full((1,), math.inf, **f64)
    minimum = float(_all_reduce(minimum, "min", group)[0])

    local_count = num_rows * num_codes
    counts = torch.tensor([local_count], **f64)
    means = pivot + first / max(local_count, 1)
    squares = second - first**2 / max(local_count, 1)
    count, mean, square = _combine_moments(counts, means.reshape(1), squares.reshape(1))
    if group is not None:
        global_mean = _all_reduce(torch.stack([count * mean, count]), "sum", group)
        global_mean = global_mean[0] / global_mean[1]
        square = _all_reduce((square + count * (mean - global_mean) ** 2).reshape(1), "sum", group)[0]
    entries = total_rows * num_codes
    spread = math.sqrt(max(float(square), 0.0) / (entries - 1)) if entries > 1 else 0.0  # std of lambda * D
    # A = (D - min D) / (std D + 1e-6) = (lambda D - lambda min D) / (std(lambda D) + 1e-6 lambda)
    cost_scale = min(epsilon / (spread + 1e-6 * distances.scale), _MAX_COST_SCALE)
    return cost_scale, minimum, row_min, pivot


def _sinkhorn(features, codebook, epsilon, num_iters, normalization, group, cache, block_size, block_policy, workspace,
              soft=False, log_guard=_LOG_GUARD):
    """The engine: the assignment, or (`soft=True`, always cached) the plan with every row normalized, or
    (`soft="potentials"`, always cached) the plan's [`PlanPotentials`]."""
    name = {False: "sinkhorn_assign", True: "sinkhorn_plan", "potentials": "sinkhorn_plan_potentials"}[soft]
    with _no_autocast(features.device):
        features, codebook = _float32_operands(features, codebook, group, normalization, name)
        return _sinkhorn_float32(features, codebook, float(epsilon), int(num_iters), normalization, group, cache,
                                 block_size, block_policy, workspace, soft, log_guard, name)


def _sinkhorn_float32(features, codebook, epsilon, num_iters, normalization, group, cache, block_size, block_policy,
                      workspace, soft, log_guard, name="sinkhorn_assign"):
    device = features.device
    num_rows = features.shape[0]
    distances = _Distances(features, codebook, group, name)
    chunk_rows = _chunk_rows(codebook.shape[0], block_size)
    plan = _Plan(distances, num_rows, chunk_rows, cache, _block_entries(device, block_policy), workspace)
    total_rows = int(_all_reduce(torch.tensor([num_rows], dtype=torch.float64, device=device), "sum", group)[0])
    if total_rows == 0:
        if soft == "potentials":
            return PlanPotentials(0.0, torch.zeros(codebook.shape[0], dtype=torch.float64, device=device))
        return features.new_zeros(0, codebook.shape[0]) if soft else torch.zeros(0, dtype=torch.long, device=device)
    cost_scale, shift, row_min, pivot = _cost_map(distances, plan, normalization, epsilon, group, total_rows)
    if soft:
        if row_min is None:  # a rank without rows
            row_min = torch.zeros(0, dtype=torch.float32, device=device)
        plan_rows = _scaled_plan_passes(plan, row_min, pivot, cost_scale, shift, num_iters, group, total_rows,
                                        soft=soft, log_guard=log_guard)
        if plan_rows is None:  # a code total that the kernel's float32 range cannot vouch for: the exact passes
            plan.cached = False  # recompute lambda * D into the cache
            plan_rows = _soft_plan_passes(plan, row_min + pivot, cost_scale, shift, num_iters, group, total_rows,
                                          log_guard, potentials_only=soft == "potentials")
        if soft == "potentials":  # the logits -cost_scale * lambda * D: per unit of distance, cost_scale * lambda
            return PlanPotentials(cost_scale * distances.scale, plan_rows)
        return plan_rows
    if plan.cache is not None:
        return _scaled_plan_passes(plan, row_min, pivot, cost_scale, shift, num_iters, group, total_rows)
    # streaming, or a rank without rows (which joins the other ranks' collectives on this path)
    ids = _log_domain_passes(plan, cost_scale, shift, num_iters, group, total_rows)
    return ids[:0] if num_rows == 0 else ids


def _scaled_plan_passes(plan, row_min, pivot, cost_scale, shift, num_iters, group, total_rows, soft=False,
                        log_guard=_LOG_GUARD):
    """The recursion in scaling-vector form on the cached, row-stabilized kernel.

    With the plan's true row and code potentials ``a``, ``b`` (float64, as in the log-domain path), the cache holds
    the kernel ``G[i, j] = exp(sigma + logits[i, j] + c[j] - m[i])`` for the code potentials ``c`` of the last time
    it was built and its row maxima ``m`` (so each row's largest entry is ``e^sigma``), and the plan is
    ``Q[i, j] = G[i, j] * exp(a[i] + m[i] - sigma) * exp(b[j] - c[j])``. A pass is one matrix-vector product per
    block for the row totals (``G @ exp(b - c)``) and one for the code totals (``G^T @ exp(a + m)``): no ``exp`` or
    ``log`` of plan-sized data. Once ``b - c`` spans more than ``_CODE_SPREAD`` nats, the kernel is rebuilt from the
    distances with ``c = b``. See docs/sinkhorn.md for why nothing that float32 drops can matter.

    ``soft="potentials"`` returns the code potentials ``b`` instead (every row of the plan is
    ``softmax_j(logits[i, j] + b[j])``), without the output pass.
    ``soft=True`` returns the cache holding the plan with every row normalized instead of the row-wise argmax. The
    guards may then be off (``log_guard = -inf``): a code total is then only trusted while it stays far above what
    the kernel's floored entries could add to it; otherwise this returns ``None`` (on every rank alike) and the
    caller runs the exact passes (`_soft_plan_passes`).
    """
    num_rows, num_codes = plan.num_rows, plan.num_codes
    device = plan.distances.features.device
    f64 = dict(dtype=torch.float64, device=device)
    guard = torch.tensor(log_guard, **f64)
    log_rows, log_codes = math.log(total_rows), math.log(num_codes)
    # a block's row sums (K terms <= e^sigma) and code totals (block rows terms, weights <= 1) stay finite
    sigma = _FLOAT32_LOG_MAX - 1.0 - math.log(max(plan.rows, num_codes))
    headroom = torch.tensor(sigma, dtype=torch.float32, device=device)
    row_sums = torch.empty(num_rows, dtype=torch.float32, device=device)
    row_max = torch.empty(num_rows, dtype=torch.float32, device=device)
    # Every floored kernel entry adds at most e^_EXP_FLOOR (weights <= 1): a code total this far above all of them
    # together is exact in float32.
    trusted = math.log(total_rows) + _EXP_FLOOR + 17.0

    row_base = row_min + pivot  # each row's smallest lambda * D (float32, as the cache held it)

    def rebuild_kernel(code_potentials):
        """Rebuild ``G`` in the cache from the distances for ``c = code_potentials``; return ``m`` (float64)."""
        offset = (code_potentials - code_potentials.max()).float()
        for start, stop, block in plan.blocks():
            # c[j] - k * (lambda D[i, j] - base[i]) from freshly computed distances: row differences, which float32
            # holds exactly however large lambda D is; the rows' own levels -k * (base[i] - shift) stay in float64
            plan.distances.block(start, stop, out=block).sub_(row_base[start:stop, None])
            torch.add(offset, block, alpha=-cost_scale, out=block)
            top = torch.amax(block, dim=1, out=row_max[start:stop])
            block.sub_(top[:, None]).add_(headroom).clamp_min_(_EXP_FLOOR).exp_()
        return row_max.double() + code_potentials.max() + (row_base.double() - shift) * (-cost_scale)

    def untrusted(column):
        """Whether a guard-free soft plan cannot rely on these code totals (agreed over ranks)."""
        if not soft or log_guard > -math.inf:
            return False
        failed = torch.tensor([float(bool((column.log() < trusted).any()))], **f64)
        return bool(_all_reduce(failed, "max", group)[0] > 0)

    # ---- pass 1: the kernel (the cache holds x - pivot; m is known from pass 0), the initial totals -------------
    kernel_rows = (row_min.double() + pivot - shift) * (-cost_scale)
    top = float(kernel_rows.max()) if num_rows else -math.inf
    weights = torch.exp(kernel_rows - top).float()
    column = torch.zeros(num_codes, **f64)
    for start, stop, block in plan.blocks():
        torch.add(headroom, block.sub_(row_min[start:stop, None]), alpha=-cost_scale, out=block)
        block.clamp_min_(_EXP_FLOOR).exp_()
        torch.sum(block, dim=1, out=row_sums[start:stop])
        column += (block.t() @ weights[start:stop]).double()
    total = (row_sums.double() * weights.double()).sum()
    # these sums are exp(logits) summed, times e^(sigma - top): reduce them on that scale (ranks whose block rows
    # differ have different sigmas)
    packed, scale = _reduce_scaled(torch.cat([column, total.reshape(1)]), top - sigma, group)
    column, total = packed[:-1], packed[-1]
    if untrusted(column):
        return None
    # Q = exp(logits) / (sum + 1e-8), where exp(logits[i, j]) = G[i, j] exp(m[i] - sigma)
    log_norm = torch.logaddexp(torch.log(total) + scale, guard)
    row_potentials = (-log_norm).expand(num_rows).clone()
    log_columns = torch.log(column) + scale - log_norm
    code_potentials = torch.zeros(num_codes, **f64)
    kernel_codes = torch.zeros(num_codes, **f64)

    ids = torch.empty(num_rows, dtype=torch.long, device=device)
    for iteration in range(num_iters + int(soft and num_iters == 0)):
        if num_iters:
            code_potentials -= torch.logaddexp(log_columns, guard) + log_codes  # code normalization
        pending = code_potentials - kernel_codes
        last = iteration >= num_iters - 1
        if last and soft == "potentials":
            return code_potentials
        if (soft or not last) and float(pending.max() - pending.min()) > _CODE_SPREAD:
            kernel_rows = rebuild_kernel(code_potentials)
            kernel_codes = code_potentials.clone()
            pending = torch.zeros_like(pending)
        pending_top, pending_bottom = pending.max(), pending.min()
        factors = torch.exp(pending - pending_top).float()
        if last:
            for start, stop, block in plan.blocks():
                if soft:  # the plan's rows G[i, j] exp(b[j] - c[j]), normalized (their scale a[i] + m[i] cancels)
                    block.mul_(factors).div_(block.sum(dim=1, keepdim=True))
                else:  # the last row normalization does not move any row's argmax
                    _first_extreme_per_row(block.mul_(factors), ids[start:stop])
            return (plan.cache if num_rows else plan.distances.features.new_zeros(0, num_codes)) if soft else ids
        # Each row of G has an entry e^sigma, so after its normalization a[i] + m[i] - sigma <= this bound and the
        # code totals' weights exp(a + m - sigma - bound) are at most 1.
        bound = float(-log_rows - sigma - pending_bottom)
        row_scales = kernel_rows - sigma
        column = torch.zeros(num_codes, **f64)
        for start, stop, block in plan.blocks():
            sums = torch.mv(block, factors, out=row_sums[start:stop])
            potentials = row_potentials[start:stop]
            scale = row_scales[start:stop]
            # row normalization, then this block's share of the next code totals
            potentials -= torch.logaddexp(potentials + scale + pending_top + sums.double().log(), guard) + log_rows
            column += (block.t() @ torch.exp(potentials + scale - bound).float()).double()
        column, column_scale = _reduce_scaled(column, bound, group)
        if untrusted(column):
            return None
        log_columns = torch.log(column) + column_scale + pending
    return ids  # num_iters == 0 is nearest neighbour, handled by the caller


def _soft_plan_passes(plan, row_base, cost_scale, shift, num_iters, group, total_rows, log_guard, potentials_only=False):
    """The soft plan: the recursion in the exact log domain on logits cached in the output, block by block.

    The cache (the returned ``(N, K)`` tensor), refilled with ``lambda * D``, becomes each row's logits relative to
    its largest, ``L'[i, j] = -k * (lambda D[i, j] - row_base[i]) <= 0`` (``row_base`` each row's smallest
    ``lambda * D``); the row offsets
    ``o[i]``, the row potentials ``a`` and the code potentials ``b`` are float64 vectors, so
    ``Q[i, j] = exp(o[i] + L'[i, j] + a[i] + b[j])``. A pass computes per block, in one block-sized scratch buffer,
    the row totals (log-sum-exp over codes) and, after the row normalization, the block's share of the code totals
    (log-sum-exp over rows, merged across blocks and ranks in float64). Unlike the assignment's kernel passes, every
    total is exact however far a code lies (``exp`` only sees values within 87 nats of the running maximum, whose
    dropped remainder is below float32 resolution), so `marginal_guard=0` gives exact equipartition.
    """
    num_rows, num_codes = plan.num_rows, plan.num_codes
    device = plan.distances.features.device
    f64 = dict(dtype=torch.float64, device=device)
    guard = torch.tensor(log_guard, **f64)
    log_rows, log_codes = math.log(total_rows), math.log(num_codes)
    offsets = (row_base.double() - shift) * (-cost_scale)  # o[i]: each row's largest logit
    scratch = plan.cache.new_empty(plan.rows, num_codes) if plan.cache is not None else None

    def add_column_share(totals, block, row_weights):
        """Merge ``log sum_i exp(L'[i, j] + row_weights[i])`` over this block's rows into ``totals`` (float64)."""
        top = row_weights.max()
        work = torch.add(block, (row_weights - top).float()[:, None], out=scratch[: block.shape[0]])
        column_max = work.amax(dim=0)
        sums = work.sub_(column_max).clamp_min_(_EXP_FLOOR).exp_().sum(dim=0)
        return torch.logaddexp(totals, top + column_max.double() + sums.double().log())

    def reduce_columns(totals):
        if group is None:
            return totals
        common = _all_reduce(totals.clone(), "max", group)
        return common + _all_reduce(torch.exp(totals - common), "sum", group).log()

    # ---- pass 1: the cache becomes L' (in place), and the initial plan's code totals ---------------------------
    log_columns = torch.full((num_codes,), -math.inf, **f64)
    for start, stop, block in plan.blocks():
        block.sub_(row_base[start:stop, None]).mul_(-cost_scale)
        log_columns = add_column_share(log_columns, block, offsets[start:stop])
    log_columns = reduce_columns(log_columns)
    # Q = exp(logits) / (sum + guard): the same row potential for every row
    initial = -torch.logaddexp(torch.logsumexp(log_columns, dim=0), guard)
    row_potentials = initial.expand(num_rows).clone()
    log_columns = log_columns + initial
    code_potentials = torch.zeros(num_codes, **f64)

    # ---- iterations: code update, then one fused pass (row update + the next code totals) ----------------------
    for iteration in range(num_iters):
        code_potentials -= torch.logaddexp(log_columns, guard) + log_codes
        if iteration == num_iters - 1:
            break  # the final row normalization is the output's
        code_top = code_potentials.max()
        shifted = (code_potentials - code_top).float()
        log_columns = torch.full((num_codes,), -math.inf, **f64)
        for start, stop, block in plan.blocks():
            work = torch.add(block, shifted, out=scratch[: stop - start])
            row_max = work.amax(dim=1)
            sums = work.sub_(row_max[:, None]).clamp_min_(_EXP_FLOOR).exp_().sum(dim=1)
            potentials = row_potentials[start:stop]
            log_totals = potentials + offsets[start:stop] + code_top + row_max.double() + sums.double().log()
            potentials -= torch.logaddexp(log_totals, guard) + log_rows
            log_columns = add_column_share(log_columns, block, potentials + offsets[start:stop])
        log_columns = code_potentials + reduce_columns(log_columns)

    if potentials_only:  # the caller rebuilds the rows: softmax_j (logits[i, j] + b[j])
        return code_potentials
    # ---- the output: every row of the plan normalized, softmax_j (L'[i, j] + b[j]), in place -----------------
    if plan.cache is None:  # a rank without rows
        return plan.distances.features.new_zeros(0, num_codes)
    shifted = (code_potentials - code_potentials.max()).float()
    for _, _, block in plan.blocks():
        block.add_(shifted)
        block.sub_(block.amax(dim=1, keepdim=True)).clamp_min_(_EXP_FLOOR).exp_()
        block.div_(block.sum(dim=1, keepdim=True))
    return plan.cache


def _log_domain_passes(plan, cost_scale, shift, num_iters, group, total_rows):
    """Streaming path: the same recursion on row and code potentials, every pass recomputing its logits from the
    distances block by block (exact log domain: one ``softmax`` per block, no plan-sized buffer)."""
    num_rows, num_codes = plan.num_rows, plan.num_codes
    device = plan.distances.features.device
    f64 = dict(dtype=torch.float64, device=device)
    guard = torch.tensor(_LOG_GUARD, **f64)
    log_rows, log_codes = math.log(total_rows), math.log(num_codes)

    def logit_blocks(code_potentials):
        """Yield ``(start, stop, b[j] + logits[i, j])`` in float32."""
        offset = (code_potentials + cost_scale * shift).float()
        for start, stop, block in plan.blocks():
            # b[j] - k * (lambda D[i, j] - shift), in place (a streamed block is recomputed on every pass); the
            # offset carries + k * shift.
            yield start, stop, torch.add(offset, block, alpha=-cost_scale, out=block)

    # ---- pass 1: the initial plan's total and code totals (a running maximum keeps exp in range) ---------------
    column = torch.zeros(num_codes, **f64)
    total = torch.zeros((), **f64)
    running_max = -math.inf
    for _, _, block in logit_blocks(torch.zeros(num_codes, **f64)):
        probabilities, log_totals = _log_row_totals(block)
        block_max = float(log_totals.max())
        if block_max > running_max:
            if running_max > -math.inf:
                factor = math.exp(running_max - block_max)
                column *= factor
                total *= factor
            running_max = block_max
        weights = torch.exp(log_totals - running_max)
        total += weights.sum(dtype=torch.float64)
        column += (probabilities.t() @ weights).double()
    packed, running_max = _reduce_scaled(torch.cat([column, total.reshape(1)]), running_max, group)
    column, total = packed[:-1], packed[-1]
    # Q / (sum(Q) + 1e-8): the same row potential for every row.
    initial_row = -torch.logaddexp(torch.log(total) + running_max, guard)
    log_columns = torch.log(column) + running_max + initial_row
    row_potentials = initial_row.expand(num_rows).clone()
    code_potentials = torch.zeros(num_codes, **f64)

    # ---- iterations: code update, then one fused pass (row update + the next code totals) --------------------
    for iteration in range(num_iters):
        code_potentials -= torch.logaddexp(log_columns, guard) + log_codes
        if iteration == num_iters - 1:
            break  # the last row normalization does not move any row's argmax
        column = torch.zeros(num_codes, **f64)
        for start, stop, block in logit_blocks(code_potentials):
            probabilities, log_totals = _log_row_totals(block)
            log_row_total = row_potentials[start:stop] + log_totals.double()
            row_potentials[start:stop] -= torch.logaddexp(log_row_total, guard) + log_rows
            # each row's total, spread over its codes by the softmax
            weights = torch.exp(row_potentials[start:stop] + log_totals.double()).float()
            column += (probabilities.t() @ weights).double()
        # same collectives as the cached path (ranks may take different paths)
        column, column_log_scale = _reduce_scaled(column, 0.0, group)
        log_columns = torch.log(column) + column_log_scale

    # ---- assignment: argmax_j of the log plan (row potentials do not move it) --------------------------------
    ids = torch.empty(num_rows, dtype=torch.long, device=device)
    for start, stop, block in logit_blocks(code_potentials):
        _first_extreme_per_row(block, ids[start:stop])
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


def _dense_float32_operands(features: torch.Tensor, codebook: torch.Tensor):
    """``(features * s, codebook * s, s)`` in float32, detached, with ``s`` the power of two that brings the largest
    entry into [0.5, 1) (1 when every entry is 0), as a tensor: no host synchronization.

    Scaling by a power of two is exact, and so are the squared distances computed from the scaled operands (scaled by
    ``s^2``), so every result is the unscaled one's, bit for bit, where the unscaled squares fit in float32 -- and
    stays finite where they would overflow (entries beyond ~1e19).
    """
    features, codebook = features.detach().float(), codebook.detach().float()
    largest = torch.cat([features.reshape(-1), codebook.reshape(-1)]).abs().amax()  # the codebook is never empty
    # at most 2^126 (2^127 would do as well, 2^128 overflows): a largest entry below 2^-126 still scales below 1
    scale = torch.ldexp(torch.ones_like(largest), (-torch.frexp(largest).exponent).clamp_max(126))
    return features * scale, codebook * scale, scale


@torch.no_grad()
def dense_nearest_assign(features: torch.Tensor, codebook: torch.Tensor) -> torch.LongTensor:
    """Nearest code by one distance matmul and an argmin: tensor ops only, traceable by `torch.compile`."""
    features, codebook, _ = _dense_float32_operands(features, codebook)  # argmin is unmoved by the common scale
    scores = (codebook * codebook).sum(1) - 2 * features @ codebook.t()
    return scores.argmin(dim=1)


@torch.no_grad()
def dense_sinkhorn_assign(features: torch.Tensor, codebook: torch.Tensor, epsilon: float = 10.0, num_iters: int = 5,
                          normalization: str = "all") -> torch.LongTensor:
    """Single-process Sinkhorn assignment with tensor ops only (no host synchronization), for `torch.compile`.

    Same algorithm and guards as :func:`sinkhorn_assign`, on a materialized ``N x K`` matrix: the quantizer uses it
    while being compiled, where the engine's data-dependent block scheduling would break the graph.
    """
    features, codebook, scale = _dense_float32_operands(features, codebook)
    scaled_distances = _dense_squared_distances(features, codebook).sqrt()  # the distances times `scale`, exactly
    if normalization == "all":  # normalize_distances of the unscaled distances: its 1e-6 guard scaled alike
        cost = _normalize_all(scaled_distances, 1e-6 * scale)
    elif normalization in VALID_NORMALIZATIONS:  # "dim", "none"
        cost = scaled_distances / scale / (math.sqrt(codebook.shape[1]) if normalization == "dim" else 1.0)
    else:
        raise ValueError(f"`normalization` must be one of {VALID_NORMALIZATIONS}, got {normalization!r}.")
    cost = torch.nan_to_num(cost, nan=0.0, posinf=_MAX_COST_SCALE, neginf=0.0)
    return sinkhorn_log_plan(cost, float(epsilon), int(num_iters)).argmax(dim=1)
