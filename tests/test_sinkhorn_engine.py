"""The Sinkhorn engine's own guarantees: streaming == cached == a float64 transcription of the published algorithm,
no plan-sized allocation when streaming, the soft plan (`sinkhorn_plan`) as the same engine's output, the block
policy, and finite, valid output for degenerate inputs (hypothesis)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optvq_hf.sinkhorn as engine
from optvq_hf import OptVQQuantizer
from optvq_hf.sinkhorn import SinkhornWorkspace, euclidean_argmin, sinkhorn_assign, sinkhorn_plan
from reference_optvq import (
    assert_near_optimal,
    reference_cost,
    reference_equipartition_plan,
    reference_sinkhorn_log_plan,
)


def _published(features, codebook, epsilon=10.0, num_iters=5, normalization="all"):
    """The published algorithm in float64, exponential domain, with its +1e-8 guards (written for this file)."""
    z, c = features.double(), codebook.double()
    dist = ((z[:, None, :] - c[None, :, :]) ** 2).sum(-1).sqrt()
    if normalization == "all":
        cost = (dist - dist.mean()) / (dist.std() + 1e-6)
        cost = cost - cost.min()
    elif normalization == "dim":
        cost = dist / math.sqrt(c.shape[1])
    else:
        cost = dist
    plan = torch.exp(-epsilon * cost)
    plan = plan / (plan.sum() + 1e-8)
    rows, codes = plan.shape
    for _ in range(num_iters):
        plan = plan / (plan.sum(0, keepdim=True) + 1e-8) / codes
        plan = plan / (plan.sum(1, keepdim=True) + 1e-8) / rows
    return plan.argmax(1)


def _data(rows, codes, dim, seed, scale=1.0, offset=0.0):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rows, dim, generator=generator) * scale + offset,
        torch.randn(codes, dim, generator=generator) * scale + offset,
    )


@pytest.mark.parametrize("normalization", ["all", "dim", "none"])
@pytest.mark.parametrize("rows,codes,dim", [(300, 40, 2), (157, 96, 16), (30, 200, 5)])
def test_streaming_and_cached_paths_match_the_published_algorithm(rows, codes, dim, normalization):
    features, codebook = _data(rows, codes, dim, seed=rows + codes)
    reference = _published(features, codebook, normalization=normalization)
    cached = sinkhorn_assign(features, codebook, normalization=normalization, streaming=False)
    # odd block sizes: chunk boundaries fall everywhere
    for block_size in (1 if rows < 50 else 7, 64):
        streamed = sinkhorn_assign(
            features, codebook, normalization=normalization, streaming=True, block_size=block_size
        )
        assert torch.equal(streamed, cached)
    assert int((cached != reference).sum()) <= 1


def test_auto_streams_above_the_limit_with_the_same_result():
    features, codebook = _data(200, 50, 8, seed=3)
    small_limit = sinkhorn_assign(features, codebook, dense_limit=100)  # streams
    large_limit = sinkhorn_assign(features, codebook, dense_limit=10**9)  # caches
    assert torch.equal(small_limit, large_limit)
    assert torch.equal(large_limit, _published(features, codebook))


def test_guards_matter_and_are_reproduced():
    # Codes far from every feature have column totals far below 1e-8: the guard caps how much Sinkhorn can boost
    # them. Dropping the guards would move these assignments; we must match the guarded algorithm exactly.
    features, codebook = _data(400, 64, 4, seed=11)
    codebook[32:] = codebook[32:] * 6.0
    reference = _published(features, codebook)
    unguarded = _unguarded(features, codebook)
    assert not torch.equal(reference, unguarded)
    assert torch.equal(sinkhorn_assign(features, codebook), reference)
    assert torch.equal(sinkhorn_assign(features, codebook, streaming=True, block_size=33), reference)


def _unguarded(features, codebook, epsilon=10.0, num_iters=5):
    z, c = features.double(), codebook.double()
    dist = torch.cdist(z, c)
    cost = (dist - dist.mean()) / (dist.std() + 1e-6)
    log_plan = -epsilon * (cost - cost.min())
    for _ in range(num_iters):
        log_plan = log_plan - torch.logsumexp(log_plan, 0, keepdim=True)
        log_plan = log_plan - torch.logsumexp(log_plan, 1, keepdim=True)
    return log_plan.argmax(1)


def _code_potential_spread(features, codebook, epsilon=10.0, num_iters=5, normalization="all"):
    """Largest span (nats) of the published algorithm's cumulative code scalings, float64 (written for this file)."""
    z, c = features.double(), codebook.double()
    dist = torch.cdist(z, c)
    if normalization == "all":
        cost = (dist - dist.mean()) / (dist.std() + 1e-6)
        cost = cost - cost.min()
    else:
        cost = dist / math.sqrt(c.shape[1]) if normalization == "dim" else dist
    log_plan = -epsilon * cost
    log_plan = log_plan - torch.logsumexp(log_plan.flatten(), 0)
    guard = math.log(1e-8)
    rows, codes = log_plan.shape
    potentials, spread = torch.zeros(codes, dtype=torch.float64), 0.0
    for _ in range(num_iters):
        step = -torch.logaddexp(torch.logsumexp(log_plan, 0), torch.tensor(guard)) - math.log(codes)
        potentials, log_plan = potentials + step, log_plan + step
        spread = max(spread, float(potentials.max() - potentials.min()))
        log_plan = log_plan - torch.logaddexp(torch.logsumexp(log_plan, 1, keepdim=True), torch.tensor(guard))
        log_plan = log_plan - math.log(rows)
    return spread


@pytest.mark.parametrize("normalization", ["all", "dim", "none"])
@pytest.mark.parametrize("num_iters", [8, 20])
def test_long_runs_with_far_codes_match_the_published_algorithm(num_iters, normalization):
    # Half the codes far from every feature: their column totals stay under the 1e-8 guard, so Sinkhorn keeps boosting
    # them by up to ~14 nats per iteration (K = 64) and the code scalings span far more than float32's exp range. The
    # cached path must absorb them into its kernel (and rescale rows that drift) without losing an assignment.
    features, codebook = _data(400, 64, 4, seed=1)
    codebook[32:] *= 20.0
    if normalization != "all":  # the "all" normalization divides by the std: its spread stays near 30 nats
        assert _code_potential_spread(features, codebook, num_iters=num_iters, normalization=normalization) > 80
    reference = _published(features, codebook, num_iters=num_iters, normalization=normalization)
    for streaming in (False, True):
        ids = sinkhorn_assign(features, codebook, num_iters=num_iters, normalization=normalization, streaming=streaming)
        assert torch.equal(ids, reference), (streaming, int((ids != reference).sum()))


def test_workspace_is_reused_grown_and_never_copied():
    import copy
    import pickle

    workspace = SinkhornWorkspace()
    features, codebook = _data(300, 40, 3, seed=7)
    expected = sinkhorn_assign(features, codebook)
    assert torch.equal(sinkhorn_assign(features, codebook, workspace=workspace), expected)
    pointer = workspace.buffer.data_ptr()
    assert workspace.buffer.numel() == 300 * 40
    # a smaller call reuses the same memory, a larger one grows it; results never depend on leftovers
    fewer = features[:100]
    assert torch.equal(sinkhorn_assign(fewer, codebook, workspace=workspace), sinkhorn_assign(fewer, codebook))
    assert workspace.buffer.data_ptr() == pointer
    more = torch.cat([features, features + 0.5])
    assert torch.equal(sinkhorn_assign(more, codebook, workspace=workspace), sinkhorn_assign(more, codebook))
    assert workspace.buffer.numel() == 600 * 40
    # the streaming path does not touch it
    sinkhorn_assign(features, codebook, workspace=workspace, streaming=True)
    assert workspace.buffer.numel() == 600 * 40
    assert copy.deepcopy(workspace).buffer is None and pickle.loads(pickle.dumps(workspace)).buffer is None
    workspace.release()
    assert workspace.buffer is None
    with pytest.raises(ValueError, match="SinkhornWorkspace"):
        sinkhorn_assign(features, codebook, workspace=torch.empty(300 * 40))


def test_workspace_shared_by_threads_does_not_race():
    import threading

    workspace = SinkhornWorkspace()
    cases = [_data(400 + 37 * index, 48, 3, seed=index) for index in range(4)]
    expected = [sinkhorn_assign(features, codebook) for features, codebook in cases]
    results, sizes = {}, {}

    def work(index):
        for _ in range(3):
            results[index] = sinkhorn_assign(*cases[index], workspace=workspace)
        sizes[index] = workspace.buffer.numel()  # this thread's own buffer, sized for its own rows

    threads = [threading.Thread(target=work, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(results[index], expected[index]) for index in range(4))
    assert sizes == {index: (400 + 37 * index) * 48 for index in range(4)}
    assert workspace.buffer is None  # this thread never ran a cached call with it


def test_quantizer_keeps_its_workspace_out_of_state_and_copies():
    import copy

    quantizer = OptVQQuantizer(dim=8, codebook_size=32, num_heads=2).train()
    features = torch.randn(2, 8, 6, 6)
    first = quantizer(features).token_ids
    assert quantizer.sinkhorn_workspace.buffer is not None  # the cached path ran in it
    assert torch.equal(quantizer(features).token_ids, first)
    assert not any("workspace" in key for key in quantizer.state_dict())
    twin = copy.deepcopy(quantizer)
    assert twin.sinkhorn_workspace.buffer is None
    assert torch.equal(twin(features).token_ids, first)


def test_underflow_regime_is_the_exact_log_domain_argmax():
    # "none" with every distance near 200: exp(-10 * D) is 0 in float64 for every entry, the published algorithm
    # divides 0 by 1e-8 and returns code 0 everywhere. Ours is the argmax of the untruncated plan, checked against a
    # float64 log-domain transcription (logsumexp instead of sums, same guards).
    features, codebook = _data(120, 20, 4, seed=5, scale=3.0)
    features = features + 100.0
    assert float(torch.exp(-10.0 * torch.cdist(features.double(), codebook.double())).max()) == 0.0
    assert int(_published(features, codebook, normalization="none").max()) == 0
    z, c = features.double(), codebook.double()
    log_plan = -10.0 * torch.cdist(z, c)
    guard = torch.tensor(math.log(1e-8), dtype=torch.float64)
    log_plan = log_plan - torch.logaddexp(torch.logsumexp(log_plan.flatten(), 0), guard)
    for _ in range(5):
        log_plan = log_plan - torch.logaddexp(torch.logsumexp(log_plan, 0, keepdim=True), guard) - math.log(20)
        log_plan = log_plan - torch.logaddexp(torch.logsumexp(log_plan, 1, keepdim=True), guard) - math.log(120)
    ours = sinkhorn_assign(features, codebook, normalization="none")
    assert torch.equal(ours, log_plan.argmax(1))
    assert ours.unique().numel() > 1  # not the published all-zero collapse


def test_streaming_never_allocates_a_plan_sized_buffer():
    rows, codes = 2048, 1024
    features, codebook = _data(rows, codes, 8, seed=0)
    plan_bytes = rows * codes * 4

    def largest_allocation(**kwargs):
        with torch.profiler.profile(profile_memory=True) as prof:
            sinkhorn_assign(features, codebook, **kwargs)
        return max(event.cpu_memory_usage for event in prof.events())

    assert largest_allocation(streaming=False) >= plan_bytes  # the profiler does see the cache
    assert largest_allocation(streaming=True, block_size=128) <= plan_bytes // 8


def test_nearest_is_chunked_and_exact():
    features, codebook = _data(1000, 300, 16, seed=2)
    expected = torch.cdist(features.double(), codebook.double()).argmin(1)
    for block_size in (None, 1, 77):
        assert torch.equal(euclidean_argmin(features, codebook, block_size=block_size), expected)
    small_d = _data(1000, 300, 2, seed=4)
    assert torch.equal(euclidean_argmin(*small_d), torch.cdist(*(t.double() for t in small_d)).argmin(1))


@pytest.mark.parametrize("largest", [True, False])
def test_row_extremes_are_torchs_first_extremes(largest):
    # The engine's argmax / argmin of a block (numpy's SIMD kernels on CPU) returns torch's ids: the first extreme
    # entry of every row, ties (integer-valued blocks), infinities and NaN included; other layouts fall back to torch.
    from optvq_hf.sinkhorn import _first_extreme_per_row

    generator = torch.Generator().manual_seed(0)
    blocks = [torch.rand(300, 257, generator=generator), torch.randint(0, 3, (300, 64), generator=generator).float()]
    special = torch.randn(6, 5, generator=generator)
    special[0, 1] = special[0, 3] = float("nan")
    special[1, :2] = float("inf")
    special[2, 2:4] = -float("inf")
    special[3] = float("inf")
    blocks += [special, torch.rand(40, 30, generator=generator).t(), torch.rand(50, 20, generator=generator).double()]
    blocks.append(torch.rand(30, 20, generator=generator).requires_grad_())  # numpy cannot take it: torch's kernel
    for block in blocks:
        out = torch.empty(block.shape[0], dtype=torch.long)
        expected = torch.argmax(block, dim=1) if largest else torch.argmin(block, dim=1)
        assert _first_extreme_per_row(block, out, largest=largest) is out
        assert torch.equal(out, expected)


def test_plan_carries_no_gradient_and_backward_only_touches_chosen_codes():
    quantizer = OptVQQuantizer(dim=8, codebook_size=64, num_heads=2, use_projection=False).train()
    features = torch.randn(4, 8, 6, 6, requires_grad=True)
    output = quantizer(features)
    output.loss.backward()
    used = torch.zeros(64, dtype=torch.bool)
    used[output.token_ids.flatten()] = True
    grad_rows = quantizer.embedding.weight.grad.abs().sum(1) > 0
    assert torch.equal(grad_rows, used)
    assert features.grad is not None and torch.isfinite(features.grad).all()


def test_quantizer_streaming_option_gives_the_same_tokens():
    torch.manual_seed(0)
    features = torch.randn(2, 16, 8, 8)
    cached = OptVQQuantizer(dim=16, codebook_size=128, num_heads=4, sinkhorn_streaming=False).train()
    streamed = OptVQQuantizer(dim=16, codebook_size=128, num_heads=4, sinkhorn_streaming=True).train()
    streamed.load_state_dict(cached.state_dict())
    assert torch.equal(cached(features).token_ids, streamed(features).token_ids)
    with pytest.raises(ValueError, match="sinkhorn_streaming"):
        OptVQQuantizer(dim=16, codebook_size=8, sinkhorn_streaming="yes")


def test_bad_engine_arguments():
    features, codebook = _data(4, 3, 2, seed=0)
    with pytest.raises(ValueError, match="streaming"):
        sinkhorn_assign(features, codebook, streaming="always")
    with pytest.raises(ValueError, match="block_size"):
        sinkhorn_assign(features, codebook, block_size=0)
    with pytest.raises(ValueError, match="floating point"):
        sinkhorn_assign(features.long(), codebook)


# ------------------------------------------------------------------------------------------------------------------
# The soft plan
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalization", ["all", "dim", "none"])
@pytest.mark.parametrize("rows,codes,dim,num_iters", [(300, 40, 2, 5), (157, 96, 16, 3), (30, 200, 5, 0)])
def test_soft_plan_is_the_engines_plan(rows, codes, dim, num_iters, normalization):
    features, codebook = _data(rows, codes, dim, seed=rows + codes)
    # with the published guards, its row-wise argmax is the engine's assignment ...
    guarded = sinkhorn_plan(features, codebook, 10.0, num_iters, normalization, marginal_guard=1e-8)
    assigned = sinkhorn_assign(features, codebook, 10.0, num_iters, normalization)
    assert int((guarded.argmax(1) != assigned).sum()) <= 1
    # ... and without them it is the exact equipartition plan (float64 log-domain reference)
    exact = sinkhorn_plan(features, codebook, 10.0, num_iters, normalization)
    expected = reference_equipartition_plan(features, codebook, 10.0, num_iters, normalization)
    torch.testing.assert_close(exact.double(), expected, atol=2e-5, rtol=0)
    assert exact.shape == (rows, codes) and exact.dtype == torch.float32 and not exact.requires_grad
    torch.testing.assert_close(exact.sum(1), torch.ones(rows))
    # block boundaries anywhere give the same plan
    torch.testing.assert_close(sinkhorn_plan(features, codebook, 10.0, num_iters, normalization, block_size=7), exact)


def test_soft_plan_degenerate_sizes_and_errors():
    features, codebook = _data(5, 3, 2, seed=0)
    assert sinkhorn_plan(features[:0], codebook).shape == (0, 3)
    assert torch.equal(sinkhorn_plan(features, codebook[:1]), torch.ones(5, 1))
    with pytest.raises(ValueError, match="marginal_guard"):
        sinkhorn_plan(features, codebook, marginal_guard=-1.0)
    with pytest.raises(ValueError, match="sinkhorn_plan expects"):
        sinkhorn_plan(features[0], codebook)
    with pytest.raises(ValueError, match="block_policy"):
        sinkhorn_plan(features, codebook, block_policy="spin")


def test_soft_plan_allocates_only_its_output():
    rows, codes = 2048, 1024
    features, codebook = _data(rows, codes, 8, seed=0)
    with torch.profiler.profile(profile_memory=True) as prof:
        sinkhorn_plan(features, codebook)
    plan_bytes = rows * codes * 4
    large = [event.cpu_memory_usage for event in prof.events()
             if event.name == "aten::empty" and event.cpu_memory_usage >= plan_bytes // 8]
    assert large == [plan_bytes]  # the returned plan itself; the passes work in it and in one block


def test_block_policy_is_an_explicit_setting(monkeypatch):
    cpu = torch.device("cpu")
    assert engine.get_block_policy() == "active"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the environment no longer decides
    assert engine._block_entries(cpu) == 1 << 24
    assert engine._block_entries(cpu, "passive") == 1 << 22
    features, codebook = _data(3000, 700, 8, seed=1)
    active = sinkhorn_assign(features, codebook)
    try:
        engine.set_block_policy("passive")
        assert engine.get_block_policy() == "passive" and engine._block_entries(cpu) == 1 << 22
        assert engine._block_entries(cpu, "active") == 1 << 24  # a call's argument wins
        assert torch.equal(sinkhorn_assign(features, codebook), active)  # the blocks change, not the result
        torch.testing.assert_close(sinkhorn_plan(features, codebook), sinkhorn_plan(features, codebook,
                                                                                    block_policy="active"))
    finally:
        engine.set_block_policy("active")
    with pytest.raises(ValueError, match="block_policy"):
        engine.set_block_policy("PASSIVE")
    with pytest.raises(ValueError, match="block_policy"):
        sinkhorn_assign(features, codebook, block_policy="sleep")


# ------------------------------------------------------------------------------------------------------------------
# Property-based robustness
# ------------------------------------------------------------------------------------------------------------------
_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(ids, rows, codes):
    assert ids.dtype == torch.long and ids.shape == (rows,)
    if rows:
        assert int(ids.min()) >= 0 and int(ids.max()) < codes


# any finite input: sizes down to 0 rows and 1 code, scales from 1e-30 to 1e30, huge offsets, constant inputs
_ANY_INPUT = dict(
    rows=st.integers(0, 40),
    codes=st.integers(1, 40),
    dim=st.integers(1, 6),
    log_scale=st.floats(-30, 30),
    offset=st.sampled_from([0.0, 1.0, -1e4, 1e6]),
    constant=st.booleans(),
    normalization=st.sampled_from(["all", "dim", "none"]),
    num_iters=st.integers(0, 12),
    seed=st.integers(0, 2**16),
)


def _check_near_optimal(ids, features, codebook, num_iters, normalization):
    """Every row's code is the float64 plan's best (on the same float32 values) up to float32 resolution: 1e-3 nats
    plus 1e-4 of the row's logit spread (which reaches 1e31 at the largest scales)."""
    log_plan = reference_sinkhorn_log_plan(features, codebook, 10.0, num_iters, normalization)
    spread = log_plan.max(dim=1).values - log_plan.min(dim=1).values
    gaps = log_plan.max(dim=1).values - log_plan.gather(1, ids[:, None]).squeeze(1)
    assert bool((gaps <= 1e-3 + 1e-4 * spread).all()), (gaps.max(), spread.max())


@_SETTINGS
@given(**_ANY_INPUT, streaming=st.booleans())
def test_any_finite_input_gives_valid_codes(
    rows, codes, dim, log_scale, offset, constant, normalization, num_iters, streaming, seed
):
    features, codebook = _data(rows, codes, dim, seed, scale=10.0**log_scale, offset=offset)
    if constant:  # std 0: every distance identical
        features = torch.full_like(features, offset)
        codebook = torch.full_like(codebook, offset)
    ids = sinkhorn_assign(
        features, codebook, normalization=normalization, num_iters=num_iters, streaming=streaming, block_size=5
    )
    _check(ids, rows, codes)
    nearest = euclidean_argmin(features, codebook)
    _check(nearest, rows, codes)
    if constant:  # a uniform plan: code 0 everywhere
        assert ids.tolist() == nearest.tolist() == [0] * rows
    elif rows:
        _check_near_optimal(ids, features, codebook, num_iters, normalization)
        distances = torch.cdist(features.double(), codebook.double())
        chosen = distances.gather(1, nearest[:, None]).squeeze(1)
        assert bool((chosen - distances.min(dim=1).values <= 1e-5 * distances.max(dim=1).values).all())


@_SETTINGS
@given(
    rows=st.sampled_from([1, 3, 200]),
    codes=st.sampled_from([1, 2, 64]),
    log_scale=st.floats(-3, 3),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_half_precision_inputs_under_autocast(rows, codes, log_scale, dtype, seed):
    features, codebook = _data(rows, codes, 4, seed, scale=10.0**log_scale)
    features, codebook = features.to(dtype), codebook.to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids = sinkhorn_assign(features, codebook)
    _check(ids, rows, codes)
    # autocast does not leak into the engine: same as float32 on the same (rounded) values
    assert torch.equal(ids, sinkhorn_assign(features.float(), codebook.float()))


@_SETTINGS
@given(dtype=st.sampled_from([torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_quantizer_under_autocast_is_finite(dtype, seed):
    torch.manual_seed(seed)
    quantizer = OptVQQuantizer(dim=8, codebook_size=16, num_heads=2).train()
    features = (torch.randn(2, 8, 4, 4) * 3).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = quantizer(features)
    assert output.quantized.dtype == dtype
    _check(output.token_ids.flatten(), 2 * 4 * 4 * 2, 16)
    # float32 inside: the tokens of the same (rounded) values in float32, the loss of float64 on them
    reference = quantizer(features.float())
    assert torch.equal(output.token_ids, reference.token_ids)
    rows = features.double().permute(0, 2, 3, 1).reshape(-1, 4)
    codes = quantizer.codebook.detach().double()[output.token_ids.permute(0, 2, 3, 1).reshape(-1)]
    torch.testing.assert_close(output.loss.double(), 1.25 * ((rows - codes) ** 2).mean(), atol=0, rtol=1e-5)
    assert torch.equal(output.quantized, reference.quantized.to(dtype))


@_SETTINGS
@given(**_ANY_INPUT, epsilon=st.sampled_from([0.1, 10.0, 1e4]))
def test_any_finite_input_gives_a_valid_soft_plan(
    rows, codes, dim, log_scale, offset, constant, normalization, num_iters, epsilon, seed
):
    features, codebook = _data(rows, codes, dim, seed, scale=10.0**log_scale, offset=offset)
    if constant:
        features = torch.full_like(features, offset)
        codebook = torch.full_like(codebook, offset)
    plan = sinkhorn_plan(features, codebook, epsilon, num_iters, normalization)
    assert plan.shape == (rows, codes) and torch.isfinite(plan).all() and bool((plan >= 0).all())
    torch.testing.assert_close(plan.sum(1), torch.ones(rows))
    if constant:  # std 0: uniform rows
        torch.testing.assert_close(plan, torch.full_like(plan, 1 / codes))
    elif rows:
        # the float64 plan on the same values, wherever float32 logits can express it: the logits' spread (in
        # nats) times float32's resolution must stay small (at 1e3 nats the error measured here was below 4e-6)
        logit_spread = float(epsilon * reference_cost(features, codebook, normalization).max())
        if logit_spread <= 1e3:
            expected = reference_equipartition_plan(features, codebook, epsilon, num_iters, normalization)
            torch.testing.assert_close(plan.double(), expected, atol=5e-5, rtol=0)


def test_plan_potentials_defaults_are_the_documented_ones():
    """sinkhorn_plan_potentials' defaults (epsilon 10, 5 iterations, "all", no marginal guard): its rows are the
    guard-free float64 plan of the same defaults, written from the paper."""
    from optvq_hf.sinkhorn import sinkhorn_plan_potentials

    features, codebook = _data(120, 24, 3, seed=11, scale=1.5)
    potentials = sinkhorn_plan_potentials(features, codebook)
    rebuilt = torch.softmax(-potentials.distance_scale * torch.cdist(features.double(), codebook.double())
                            + potentials.code_potentials, dim=1)
    torch.testing.assert_close(rebuilt, reference_equipartition_plan(features, codebook, 10.0, 5, "all"), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("codes,dim", [(2, 3), (5, 1), (1, 3)])
def test_plan_potentials_of_few_codes_and_one_dimension_give_the_plan(codes, dim):
    # the one-code shortcut is for one code only: two codes, or one-dimensional features, run the passes
    from optvq_hf.sinkhorn import sinkhorn_plan_potentials

    features, codebook = _data(40, codes, dim, seed=codes * 10 + dim)
    potentials = sinkhorn_plan_potentials(features, codebook)
    assert potentials.code_potentials.shape == (codes,)
    rebuilt = torch.softmax(-potentials.distance_scale * torch.cdist(features.double(), codebook.double())
                            + potentials.code_potentials, dim=1)
    torch.testing.assert_close(rebuilt, reference_equipartition_plan(features, codebook), atol=1e-5, rtol=0)


def test_the_dense_log_plan_is_the_published_plan_row_by_row():
    """sinkhorn_log_plan (the traceable path's recursion, rows left unscaled) in float64 on codes far enough that the
    1e-8 guards decide their share: every row, normalized, is the published plan's row, and the traceable
    assignment (default "all") is its argmax."""
    from optvq_hf.sinkhorn import dense_sinkhorn_assign, sinkhorn_log_plan

    features, codebook = _data(400, 64, 4, seed=11)
    codebook[32:] = codebook[32:] * 6.0
    log_plan = sinkhorn_log_plan(reference_cost(features, codebook), 10.0, 5)
    expected = reference_sinkhorn_log_plan(features, codebook)
    torch.testing.assert_close(torch.softmax(log_plan, 1), torch.softmax(expected, 1), atol=1e-9, rtol=0)
    assert torch.equal(dense_sinkhorn_assign(features, codebook), _published(features, codebook))


@pytest.mark.parametrize("normalization", ["all", "dim", "none"])
def test_the_dense_paths_where_float32_squares_overflow_give_the_engines_codes(normalization):
    """Entries of ~1e21 (2^70): |z|^2 - 2 z.c + |c|^2 overflows float32 (inf - inf: NaN costs, wrong codes before); the
    dense paths scale both operands by one power of two, exactly, and choose what the engine chooses (under "all",
    scale-free there, the unit-scale codes). Entries below float32's normal range (2^-135) too."""
    from optvq_hf.sinkhorn import dense_nearest_assign, dense_sinkhorn_assign

    features, codebook = _data(300, 48, 4, seed=0)
    big = torch.ldexp(features, torch.tensor(70)), torch.ldexp(codebook, torch.tensor(70))
    assert not torch.isfinite(big[0].square().sum(1)).all()  # the unscaled squares do overflow
    tokens = dense_sinkhorn_assign(*big, normalization=normalization)
    assert torch.equal(tokens, sinkhorn_assign(*big, 10.0, 5, normalization))
    assert torch.equal(dense_nearest_assign(*big), euclidean_argmin(*big))
    assert torch.equal(dense_nearest_assign(*big), euclidean_argmin(features, codebook))
    tiny = torch.ldexp(features, torch.tensor(-135)), torch.ldexp(codebook, torch.tensor(-135))
    assert torch.equal(dense_nearest_assign(*tiny), euclidean_argmin(features, codebook))
    assert torch.equal(dense_sinkhorn_assign(*tiny, normalization=normalization),
                       sinkhorn_assign(*tiny, 10.0, 5, normalization))
    if normalization == "all":
        assert torch.equal(tokens, dense_sinkhorn_assign(features, codebook))
    # the scale follows the largest magnitude, whatever the signs: positive entries from 2^-60 to 2^10
    positive = features.abs() * 2.0**10, codebook.abs() * 2.0**10
    positive[0][0, 0] = 2.0**-60
    assert torch.equal(dense_sinkhorn_assign(*positive, normalization=normalization),
                       sinkhorn_assign(*positive, 10.0, 5, normalization))
    assert torch.equal(dense_nearest_assign(*positive), euclidean_argmin(*positive))


def test_the_dense_paths_compute_in_float32_and_choose_identical_codes():
    # half-precision inputs are computed in float32 (bf16 distances would tie and swap near codes); a feature equal
    # to a code has distance 0 to it even where |z|^2 - 2 z.c + |c|^2 rounds below 0
    from optvq_hf.sinkhorn import dense_nearest_assign, dense_sinkhorn_assign

    features, codebook = _data(300, 32, 8, seed=3)
    half_features, half_codebook = features.bfloat16(), codebook.bfloat16()
    z, c = half_features.double(), half_codebook.double()
    assert torch.equal(dense_nearest_assign(half_features, half_codebook), torch.cdist(z, c).argmin(1))
    assert torch.equal(dense_sinkhorn_assign(half_features, half_codebook),
                       dense_sinkhorn_assign(half_features.float(), half_codebook.float()))
    with_codes = torch.cat([codebook, features[:50]])
    assert torch.equal(dense_sinkhorn_assign(with_codes, codebook)[:32], torch.arange(32))
