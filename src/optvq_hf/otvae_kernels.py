"""OT-VAE's per-entry training math, written once in tensor ops: run eagerly block by block, or compiled.

[`~optvq_hf.otvae.OTVAEQuantizer`]'s training pass touches every (row, code) pair twice (forward and backward): a
distance, the logits relative to the row's largest, `exp`, the targets' weights, the Gumbel noise of that pair, and
a handful of row (and, in backward, code) sums. Nothing of size `rows x codes` is needed afterwards, only those sums.
The functions here compute them from the operands alone:

* [`forward_rows`] / [`backward_rows`] take a block of rows and return the block's sums. Called eagerly, each
  expression is evaluated once per block and reused by its consumers (several temporary `rows x codes` tensors per
  block). Called through [`compiled_forward`] / [`compiled_backward`] (`torch.compile`, Inductor's C++ backend on CPU), the whole batch is one
  call: every consumer rebuilds the expression, Inductor inlines it into the reduction loops and merges the copies
  within a loop, so the per-entry chain runs in registers and no `rows x codes` tensor is ever written.
* The Gumbel noise is counter based ([`exponential_noise`]): the pair `(row, code)` and a seed hash to 23 random bits,
  so forward and backward (eager or compiled, any device, any block size) see the same noise without keeping it.
"""

from __future__ import annotations

import shutil
import threading

import numpy as np
import torch

from .sinkhorn import _EXP_FLOOR

_MASK32 = 0xFFFFFFFF
# A 32-bit integer finalizer (xor-shift / multiply rounds, constants from the "lowbias32" family of Chris Wellons'
# hash search). Values stay in [0, 2^32) inside int64 tensors and both multipliers are below 2^31, so every product
# is below 2^63: no signed overflow anywhere (eager, Inductor's C++, CUDA), and `>>` of a non-negative int64 is the
# logical shift.
_MIX_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)
_UNIFORM_BITS = 23  # u = (k + 1/2) / 2^23: exact in float32, in (0, 1) strictly, so E = -log u is finite and > 0



def mix32(values: torch.Tensor) -> torch.Tensor:
    """The 32-bit finalizer of int64 `values` in `[0, 2^32)` (a bijection of that range), in int64."""
    values = values ^ (values >> 16)
    values = (values * _MIX_MULTIPLIERS[0]) & _MASK32
    values = values ^ (values >> 15)
    values = (values * _MIX_MULTIPLIERS[1]) & _MASK32
    return values ^ (values >> 15)


def noise_keys(seed: int, row_start: int, row_stop: int, num_codes: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row and per-code int64 keys of the noise for rows `[row_start, row_stop)` under `seed` (a 64-bit int):
    `mix32(row + seed_low)` and `mix32(code ^ seed_high)`. The pair's key is `mix32(row_key + code_key)` (mod 2^32):
    two rows' keys differ by a pseudo-random amount, so no two rows share a run of keys."""
    low, high = seed & _MASK32, (seed >> 32) & _MASK32
    rows = torch.arange(row_start, row_stop, dtype=torch.int64, device=device)
    codes = torch.arange(num_codes, dtype=torch.int64, device=device)
    return mix32((rows + low) & _MASK32), mix32(codes ^ high)


def uniform_noise(row_keys: torch.Tensor, code_keys: torch.Tensor) -> torch.Tensor:
    """The `(rows, codes)` float32 uniforms `u = (k + 1/2) / 2^23` in `(0, 1)`, `k` the top 23 bits of the pair's key.

    Tensor operations in int64 (compiled kernels, accelerators); eagerly on CPU the same bits in numpy `uint32`
    arithmetic, whose products wrap by definition (6 to 9x faster than int64 tensor passes there)."""
    if row_keys.device.type == "cpu" and not torch.compiler.is_compiling():
        keys = row_keys.numpy().astype(np.uint32)[:, None] + code_keys.numpy().astype(np.uint32)[None, :]
        keys ^= keys >> np.uint32(16)
        keys *= np.uint32(_MIX_MULTIPLIERS[0])
        keys ^= keys >> np.uint32(15)
        keys *= np.uint32(_MIX_MULTIPLIERS[1])
        keys ^= keys >> np.uint32(15)
        keys >>= np.uint32(32 - _UNIFORM_BITS)
        uniforms = torch.from_numpy(keys.astype(np.float32))
        return uniforms.add_(0.5).mul_(2.0 ** -_UNIFORM_BITS)
    keys = mix32((row_keys[:, None] + code_keys[None, :]) & _MASK32)
    return ((keys >> (32 - _UNIFORM_BITS)).to(torch.float32) + 0.5) * (2.0 ** -_UNIFORM_BITS)


def exponential_noise(row_keys: torch.Tensor, code_keys: torch.Tensor) -> torch.Tensor:
    """`E = -log u`, standard exponential noise per pair (`-log E` is standard Gumbel noise); finite, at most 16.6."""
    return uniform_noise(row_keys, code_keys).log().neg()


def _expression(build, fused: bool):
    """`build` as a callable that consumers call for the value: compiled (`fused`), each call rebuilds the expression
    (Inductor inlines it into every consumer's loop instead of writing it out; its CPU heuristics write out any
    reused expression containing `exp` or `log`); eager, it is evaluated once."""
    if fused:
        return build
    value = build()
    return lambda: value


def _distance_builder(distance, features, codes_t):
    """`distance` (a precomputed block) or, if `None`, `||z - c||` built from the coordinates (compiled kernels)."""
    if distance is not None:
        return lambda: distance

    def build():
        squares = None
        for k in range(features.shape[1]):
            difference = features[:, k, None] - codes_t[k][None, :]
            squares = difference * difference if squares is None else squares + difference * difference
        return squares.sqrt()

    return build


def _per_coordinate(block: torch.Tensor, vectors_t: torch.Tensor) -> torch.Tensor:
    """`block @ vectors_t.T` `(n, d)` as one matrix-vector product per coordinate (a matmul with few output columns is
    several times slower on CPU)."""
    return torch.stack([torch.mv(block, vector) for vector in vectors_t], dim=1)


def forward_rows(distance, features, codes_t, decode_t, code_weights, logit_scale, target_scale, row_keys,
                 code_keys, *, shared: bool, clamp: bool, temperature: float, fused: bool):
    """The forward sums of a block of rows.

    Args:
        distance (`torch.Tensor` of shape `(n, K)` or `None`): the block's (scaled) distances `D`; `None`: built from
            `features` `(n, d)` and `codes_t` `(d, K)` (their scaled coordinates).
        decode_t (`torch.Tensor` of shape `(d, K)`): the codebook decoded by the sample (transposed).
        code_weights (`torch.Tensor` of shape `(K,)`): `e^b` if `shared`, else the code potentials `b`.
        logit_scale, target_scale (0-d `torch.Tensor`): `s` of the logits `-s D` and `k` of the targets `-k D + b`.
        row_keys, code_keys: the noise keys ([`noise_keys`]).
        shared (`bool`): the targets' weights are `P e^b` (`k = s`), else `exp(-k D + b - max)`.
        clamp (`bool`): raise the relative logits to `_EXP_FLOOR` before `exp`.
        temperature (`float`): of the Gumbel-softmax sample.
        fused (`bool`): rebuild shared expressions per consumer (compiled kernels).

    Returns `(row_min, prob_sums, target_sums, cross, target_max, sample_max, sample_sums, decoded_sums,
    token_ids)`: with `L' = -s (D - min_j D)`, `P = exp(L')`, `w` the targets' weights and `S` the unnormalized
    sample (`P / E` at temperature 1, else `exp((L' - log E) / T - max)`): `sum_j P`, `sum_j w`, `sum_j w L'`, the
    rows' largest `-k D + b` (`None` if `shared`) and `(L' - log E) / T` (`None` at temperature 1), `sum_j S`,
    `(n, d)` `sum_j S c_j` and the sample's argmax.
    """
    distance = _distance_builder(distance, features, codes_t)
    row_min = distance().amin(dim=1)
    relative = _expression(lambda: (distance() - row_min[:, None]) * -logit_scale, fused)  # L' <= 0
    if clamp:
        prob = _expression(lambda: relative().clamp_min(_EXP_FLOOR).exp(), fused)
    else:
        prob = _expression(lambda: relative().exp(), fused)
    prob_sums = prob().sum(dim=1)
    target_max = None
    if shared:
        weights = _expression(lambda: prob() * code_weights, fused)
    else:
        target_logits = _expression(lambda: code_weights - target_scale * distance(), fused)
        target_max = target_logits().amax(dim=1)
        weights = _expression(lambda: (target_logits() - target_max[:, None]).clamp_min(_EXP_FLOOR).exp(), fused)
    target_sums = weights().sum(dim=1)
    cross = (weights() * relative()).sum(dim=1)
    noise = _expression(lambda: exponential_noise(row_keys, code_keys), fused)
    sample_max = None
    if temperature == 1.0:
        sample = _expression(lambda: prob() / noise(), fused)
        token_ids = sample().argmax(dim=1)
    else:
        perturbed = _expression(lambda: (relative() - noise().log()) / temperature, fused)
        sample_max = perturbed().amax(dim=1)
        token_ids = perturbed().argmax(dim=1)
        sample = _expression(lambda: (perturbed() - sample_max[:, None]).clamp_min(_EXP_FLOOR).exp(), fused)
    sample_sums = sample().sum(dim=1)
    if fused:
        decoded_sums = torch.stack([(sample() * decode_t[k][None, :]).sum(dim=1) for k in range(decode_t.shape[0])], 1)
    else:
        decoded_sums = _per_coordinate(sample(), decode_t)
    return row_min, prob_sums, target_sums, cross, target_max, sample_max, sample_sums, decoded_sums, token_ids


def backward_rows(distance, features, codes_t, decode_t, raw_features, code_weights, logit_scale, target_scale,
                  row_keys, code_keys, row_min, target_max, sample_max, loss_rows, target_rows, sample_rows,
                  sample_offsets, code_rows, *, shared: bool, clamp: bool, temperature: float, any_zero: bool,
                  fused: bool):
    """The backward sums of a block of rows (arguments as [`forward_rows`]'s, plus the forward's row statistics).

    With the gradient with respect to the logits written per entry as
    `G = P loss_rows + w target_rows + S (sample_rows . c_j + sample_offsets)` and `gD = G / D` (0 where `D = 0`),
    returns `(row_weights, code_sums, feature_sums, code_weight_sums, decoding)`: per row `sum_j gD` `(n,)` and
    `sum_j gD c_j` `(n, d)`; per code `sum_i gD z_i` `(d, K)` (`raw_features` `z`), `sum_i gD` `(K,)`, and
    `sum_i S code_rows_i` `(d, K)` (`None` if `code_rows` is `None`: hard samples).
    """
    distance = _distance_builder(distance, features, codes_t)
    relative = _expression(lambda: (distance() - row_min[:, None]) * -logit_scale, fused)
    if clamp:
        prob = _expression(lambda: relative().clamp_min(_EXP_FLOOR).exp(), fused)
    else:
        prob = _expression(lambda: relative().exp(), fused)
    if shared:
        weights = _expression(lambda: prob() * code_weights, fused)
    else:
        weights = _expression(
            lambda: (code_weights - target_scale * distance() - target_max[:, None]).clamp_min(_EXP_FLOOR).exp(), fused)
    noise = _expression(lambda: exponential_noise(row_keys, code_keys), fused)
    if temperature == 1.0:
        sample = _expression(lambda: prob() / noise(), fused)
    else:
        sample = _expression(
            lambda: ((relative() - noise().log()) / temperature - sample_max[:, None]).clamp_min(_EXP_FLOOR).exp(),
            fused)

    def code_products():  # dy_ij = g_i . c_j, with the row's offset
        products = sample_offsets[:, None]
        for k in range(decode_t.shape[0]):
            products = products + sample_rows[:, k, None] * decode_t[k][None, :]
        return products

    def grad_distance():
        grad = (prob() * loss_rows[:, None] + weights() * target_rows[:, None] + sample() * code_products()) / distance()
        if any_zero:  # a feature on a code: D = 0, gradient 0 there (as torch.cdist)
            grad = torch.where(distance() == 0, torch.zeros_like(grad), grad)
        return grad

    grad_distance = _expression(grad_distance, fused)
    dims = range(decode_t.shape[0])
    row_weights = grad_distance().sum(dim=1)
    decoding = None
    if fused:
        code_sums = torch.stack([(grad_distance() * decode_t[k][None, :]).sum(dim=1) for k in dims], 1)
        feature_sums = torch.stack([(grad_distance() * raw_features[:, k, None]).sum(dim=0) for k in dims])
        code_weight_sums = grad_distance().sum(dim=0)
        if code_rows is not None:
            decoding = torch.stack([(sample() * code_rows[:, k, None]).sum(dim=0) for k in dims])
    else:
        code_sums = _per_coordinate(grad_distance(), decode_t)
        feature_sums = raw_features.t() @ grad_distance()
        code_weight_sums = grad_distance().sum(dim=0)
        if code_rows is not None:
            decoding = code_rows.t() @ sample()
    return row_weights, code_sums, feature_sums, code_weight_sums, decoding


# Inductor's store-or-recompute thresholds, raised so that the per-entry expressions stay inlined in the reduction
# loops (see _expression).
_INDUCTOR_OPTIONS = {
    "realize_reads_threshold": 1 << 20,
    "realize_opcount_threshold": 1 << 20,
    "realize_cpu_opcount_threshold": 1 << 20,
    "realize_acc_reads_threshold": 1 << 20,
    "realize_cpu_acc_reads_threshold": 1 << 20,
}
_compiled_cache: dict = {}
_compiled_lock = threading.Lock()


def compiler_available() -> bool:
    """Whether `torch.compile` can build CPU kernels here: TorchDynamo supports this Python and a C++ compiler is on
    the PATH (Inductor's CPU backend compiles C++)."""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return False
    except Exception:  # noqa: BLE001 - any import problem means no compiler
        return False
    return any(shutil.which(name) for name in ("g++", "c++", "clang++", "cl"))


def _compile(function):
    return torch.compile(function, fullgraph=True, dynamic=False, options=_INDUCTOR_OPTIONS)


def compiled_forward(device_type: str, shared: bool, temperature: float):
    """[`forward_rows`] over a whole batch (`distance=None`), compiled with `torch.compile(fullgraph=True)` once per
    process and combination of the static flags (the row count is a dynamic dimension, see [`run_compiled`]). The
    kernels always clamp the logits and mask zero distances (no-ops where the eager pass skips them), so that only the
    sample's shape (`shared`, `temperature`) selects a kernel. Compilation happens at the first call (seconds; Inductor
    caches the generated code on disk for later processes)."""
    key = ("forward", device_type, shared, float(temperature))
    with _compiled_lock:
        if key not in _compiled_cache:
            def forward(features, codes_t, decode_t, code_weights, logit_scale, target_scale, row_keys, code_keys):
                return forward_rows(None, features, codes_t, decode_t, code_weights, logit_scale, target_scale,
                                    row_keys, code_keys, shared=shared, clamp=True, temperature=temperature,
                                    fused=True)

            _compiled_cache[key] = _compile(forward)
        return _compiled_cache[key]


# the arguments of the compiled kernels that have one entry per row
FORWARD_ROW_ARGUMENTS = (0, 6)
BACKWARD_ROW_ARGUMENTS = (0, 3, 7, 9, 10, 11, 12, 13, 14, 15, 16)


def compiled_backward(device_type: str, shared: bool, temperature: float, hard: bool):
    """[`backward_rows`] over a whole batch, compiled as [`compiled_forward`]."""
    key = ("backward", device_type, shared, float(temperature), hard)
    with _compiled_lock:
        if key not in _compiled_cache:
            def backward(features, codes_t, decode_t, raw_features, code_weights, logit_scale, target_scale, row_keys,
                         code_keys, row_min, target_max, sample_max, loss_rows, target_rows, sample_rows,
                         sample_offsets, code_rows):
                return backward_rows(None, features, codes_t, decode_t, raw_features, code_weights, logit_scale,
                                     target_scale, row_keys, code_keys, row_min, target_max, sample_max, loss_rows,
                                     target_rows, sample_rows, sample_offsets, code_rows, shared=shared, clamp=True,
                                     temperature=temperature, any_zero=True, fused=True)

            _compiled_cache[key] = _compile(backward)
        return _compiled_cache[key]


def run_compiled(kernel, arguments, row_positions):
    """Call a compiled kernel on `arguments`, the first dimension of those at `row_positions` (the rows) marked
    dynamic (one compilation serves every batch size), with AOT autograd's common-subexpression pass off: it would
    merge the per-consumer copies of [`_expression`] again."""
    import torch._dynamo
    import torch._functorch.config as functorch_config

    for position in row_positions:
        if arguments[position] is not None:
            torch._dynamo.maybe_mark_dynamic(arguments[position], 0)
    with functorch_config.patch(cse=False):
        return kernel(*arguments)
