"""Sinkhorn assignment of features to codes (OptVQ, paper Sec. 3.3 and Algorithm 1).

The published algorithm, for features ``z`` (N, d) and codes ``c`` (K, d):

1. ``D[i, j] = ||z_i - c_j||_2`` (Euclidean, not squared).
2. Normalize ``D`` (``"all"``: subtract the mean of the whole matrix, divide by its standard deviation,
   subtract the minimum; ``"dim"``: divide by ``sqrt(d)``; ``"none"``: leave it).
3. ``Q = exp(-epsilon * D'')``, divided by its total.
4. ``num_iters`` times: scale every code's column to total ``1/K``, then every row to total ``1/N``
   (the reference code adds ``1e-8`` to each total before dividing).
5. ``token[i] = argmax_j Q[i, j]``.

We run the same recursion on logarithms. ``log Q`` stays finite where ``exp`` underflows, so the result is
identical to the published algorithm wherever that one is finite, and is the exact argmax of the (untruncated)
transport plan where the published one underflows to all-zero rows (which it would send to code 0).

What is redundant and exploited here:

* A constant shift of the cost cancels in Sinkhorn, so ``"all"``'s mean and min subtractions only matter through
  the ``+1e-8`` guards; we keep them so the guards act exactly as in the reference.
* The last row normalization does not change any row's argmax, so it is skipped.
* The plan carries no gradient: everything runs under ``torch.no_grad`` and never enters autograd.
"""

from __future__ import annotations

import math

import torch

__all__ = ["sinkhorn_assign", "normalize_distances", "pairwise_euclidean", "VALID_NORMALIZATIONS"]

VALID_NORMALIZATIONS = ("all", "dim", "none")

# The reference implementation adds this to every total before dividing by it.
_REFERENCE_GUARD = 1e-8
_LOG_GUARD = math.log(_REFERENCE_GUARD)


def pairwise_euclidean(features: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``(N, K)`` between the rows of ``features`` ``(N, d)`` and ``codebook`` ``(K, d)``."""
    return torch.cdist(features.unsqueeze(0), codebook.unsqueeze(0), p=2.0).squeeze(0)


def normalize_distances(distances: torch.Tensor, normalization: str = "all") -> torch.Tensor:
    """Normalize a distance matrix as the paper's Eqs. (11)-(12) (``"all"``), by ``sqrt(d)`` (``"dim"``) or not.

    ``"dim"`` needs the code dimension; it is handled in :func:`sinkhorn_assign`, so this helper accepts ``"all"``
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


def _validate(features: torch.Tensor, codebook: torch.Tensor, epsilon: float, num_iters: int, normalization: str):
    if features.ndim != 2 or codebook.ndim != 2:
        raise ValueError(
            f"sinkhorn_assign expects features (N, d) and codebook (K, d), got {tuple(features.shape)} and "
            f"{tuple(codebook.shape)}."
        )
    if features.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"features and codebook must share their last dimension, got d={features.shape[1]} and "
            f"d={codebook.shape[1]}."
        )
    if codebook.shape[0] < 1:
        raise ValueError("The codebook must hold at least one code.")
    if normalization not in VALID_NORMALIZATIONS:
        raise ValueError(f"`normalization` must be one of {VALID_NORMALIZATIONS}, got {normalization!r}.")
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"`epsilon` must be a positive finite number, got {epsilon}.")
    if int(num_iters) != num_iters or num_iters < 0:
        raise ValueError(f"`num_iters` must be a non-negative integer, got {num_iters}.")


@torch.no_grad()
def sinkhorn_log_plan(cost: torch.Tensor, epsilon: float, num_iters: int) -> torch.Tensor:
    """Log of the Sinkhorn plan's columns scaled for the argmax: ``-epsilon * cost + log(column scale)``.

    Rows are left unscaled (a row's scale does not move its argmax). ``cost`` must already be normalized.
    Follows the reference's order (columns, then rows) and its ``+1e-8`` guards, in log space.
    """
    num_rows, num_codes = cost.shape
    log_plan = cost * (-epsilon)
    # Q / (sum(Q) + 1e-8)
    log_plan = log_plan - torch.logaddexp(torch.logsumexp(log_plan.flatten(), 0), torch.tensor(_LOG_GUARD))
    log_num_rows, log_num_codes = math.log(num_rows), math.log(num_codes)
    for iteration in range(num_iters):
        column_totals = torch.logsumexp(log_plan, dim=0, keepdim=True)
        log_plan = log_plan - (torch.logaddexp(column_totals, column_totals.new_tensor(_LOG_GUARD)) + log_num_codes)
        if iteration == num_iters - 1:
            break
        row_totals = torch.logsumexp(log_plan, dim=1, keepdim=True)
        log_plan = log_plan - (torch.logaddexp(row_totals, row_totals.new_tensor(_LOG_GUARD)) + log_num_rows)
    return log_plan


@torch.no_grad()
def sinkhorn_assign(
    features: torch.Tensor,
    codebook: torch.Tensor,
    epsilon: float = 10.0,
    num_iters: int = 5,
    normalization: str = "all",
) -> torch.LongTensor:
    """Assign each feature to a code by entropic optimal transport (OptVQ's Sinkhorn assignment).

    Args:
        features (`torch.Tensor` of shape `(N, d)`):
            The vectors to quantize (one row per position and head).
        codebook (`torch.Tensor` of shape `(K, d)`):
            The codes in use (after any shared projection).
        epsilon (`float`, defaults to 10.0):
            Inverse temperature of the entropic plan, ``Q = exp(-epsilon * D'')``.
        num_iters (`int`, defaults to 5):
            Number of (column, row) normalization rounds. ``0`` reduces to nearest-neighbour assignment.
        normalization (`str`, defaults to `"all"`):
            How the distance matrix is normalized before the exponential: `"all"` (paper Eqs. 11-12),
            `"dim"` (divide by ``sqrt(d)``) or `"none"`.

    Returns:
        `torch.LongTensor` of shape `(N,)`: the code index of every row.
    """
    _validate(features, codebook, epsilon, num_iters, normalization)
    features = features.detach().float()
    codebook = codebook.detach().float()
    if features.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=features.device)
    distances = pairwise_euclidean(features, codebook)
    if normalization == "dim":
        cost = distances / math.sqrt(codebook.shape[1])
    else:
        cost = normalize_distances(distances, normalization)
    # Guard non-finite costs (e.g. inf distances from huge inputs) so that the plan stays defined.
    cost = torch.nan_to_num(cost, nan=0.0, posinf=torch.finfo(cost.dtype).max / 4, neginf=0.0)
    log_plan = sinkhorn_log_plan(cost, epsilon, num_iters)
    return log_plan.argmax(dim=1)
