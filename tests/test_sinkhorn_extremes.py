"""The Sinkhorn engine where its guards trigger: codes far beyond float32's exp range (the soft plan's exact
fallback passes, the assignment's kernel rebuilds), the block size as a speed-only knob, and the cross-rank
statistics' arithmetic; and where float32 leaves least room (code potentials as the recursion defines them, plans far
from the codebook, the guards after a kernel rebuild and at an initial total of 1e-8): all against float64 references
written from the paper (tests/reference_optvq.py, or the recursion written out in the test)."""

import math
import warnings

import pytest
import torch

import optvq_hf.sinkhorn as engine
from optvq_hf.sinkhorn import (
    euclidean_argmin,
    sinkhorn_assign,
    sinkhorn_log_plan,
    sinkhorn_plan,
    sinkhorn_plan_potentials,
)
from reference_optvq import (
    assert_near_optimal,
    reference_cost,
    reference_equipartition_plan,
    reference_sinkhorn_log_plan,
)


def _far_codes(rows=300, codes=256, dim=4, far=3, factor=50.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, dim, generator=generator)
    codebook = torch.randn(codes, dim, generator=generator)
    codebook[-far:] *= factor
    return features, codebook


@pytest.mark.parametrize("normalization", ["all", "dim", "none"])
@pytest.mark.parametrize("num_iters", [0, 1, 5])
def test_soft_plan_with_codes_beyond_float32_reach_is_the_exact_equipartition_plan(normalization, num_iters):
    # Three codes 50x farther than the rest: their column totals lie hundreds of nats below the others, beyond what
    # the float32 kernel can vouch for, so the guard-free plan takes the exact log-domain passes; with the published
    # guards the kernel passes stay exact. Both against float64 log-domain references.
    features, codebook = _far_codes()
    exact = sinkhorn_plan(features, codebook, 10.0, num_iters, normalization)
    expected = reference_equipartition_plan(features, codebook, 10.0, num_iters, normalization)
    torch.testing.assert_close(exact.double(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(exact.sum(1), torch.ones(len(features)))
    guarded = sinkhorn_plan(features, codebook, 10.0, num_iters, normalization, marginal_guard=1e-8)
    expected = torch.softmax(reference_sinkhorn_log_plan(features, codebook, 10.0, num_iters, normalization), dim=1)
    torch.testing.assert_close(guarded.double(), expected, atol=1e-4, rtol=0)
    # blocks of any size (a speed knob) give the same plan
    torch.testing.assert_close(sinkhorn_plan(features, codebook, 10.0, num_iters, normalization, block_size=7), exact,
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "knob,values",
    [
        ("_CHUNK_ENTRIES", [1000, 1 << 30]),  # rows of distances per matmul
        ("_BLOCK_ENTRIES", [1000, 1 << 30]),  # rows per elementwise block (active policy)
        ("_PASSIVE_BLOCK_ENTRIES", [1000, 1 << 30]),  # the same for the passive policy and streamed passes
        ("_CODE_SPREAD", [0.0, 30.0]),  # how far code potentials drift before the kernel is rebuilt
        ("_DIRECT_MAX_DIM", [0, 100]),  # distances by coordinate differences or by one matmul
        ("_FLOAT32_LOG_MAX", [0.0, 40.0]),  # where in float32's range the cached kernel's rows peak
        ("_CHUNK_ENTRIES+_PASSIVE_BLOCK_ENTRIES", [(5000, 1000)]),  # streamed chunks of several blocks each
    ],
)
def test_speed_knobs_change_no_result(monkeypatch, knob, values):
    """The engine's module constants that trade speed against memory decide how the work is cut into blocks, when the
    kernel is rebuilt and how distances are computed; none changes an assignment, and the soft plan stays within
    float32 rounding. Half the codes lie far away (code potentials drift by hundreds of nats over 20 iterations, so
    the kernel is rebuilt), on the matmul path (d=8) and the coordinate path (d=3)."""
    cases = []
    for dim in (3, 8):
        generator = torch.Generator().manual_seed(dim)
        features, codebook = torch.randn(250, dim, generator=generator), torch.randn(48, dim, generator=generator)
        codebook[24:] *= 20.0
        cases.append((features, codebook))

    def run():
        out = []
        for features, codebook in cases:
            for normalization in ("all", "none"):
                for policy in ("active", "passive"):
                    for streaming in (False, True):
                        out.append(sinkhorn_assign(features, codebook, 10.0, 20, normalization, streaming=streaming,
                                                   block_policy=policy))
                out.append(euclidean_argmin(features, codebook))
                out.append(sinkhorn_plan(features, codebook, 10.0, 20, normalization))
                out.append(sinkhorn_plan(features, codebook, 10.0, 20, normalization, marginal_guard=1e-8))
        return out

    default = run()
    for value in values:
        for name, setting in zip(knob.split("+"), value if "+" in knob else [value]):
            monkeypatch.setattr(engine, name, setting)
        for expected, got in zip(default, run()):
            if expected.dtype == torch.long:
                assert torch.equal(got, expected), (knob, value)
            else:
                torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_normalize_distances_of_two_entries_uses_their_spread():
    # the dense helper's "all" normalization: unbiased std from two entries on (a single entry has none)
    distances = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    expected = torch.tensor([[0.0, 2.0 / (math.sqrt(2.0) + 1e-6)]], dtype=torch.float64)
    torch.testing.assert_close(engine.normalize_distances(distances), expected)
    torch.testing.assert_close(engine.normalize_distances(distances.t()), expected.t())
    assert torch.equal(engine.normalize_distances(distances[:, :1]), torch.zeros(1, 1, dtype=torch.float64))


def test_normalize_distances_in_float32_keeps_the_distances_digits():
    # The mean is subtracted before dividing (a constant shift, which the minimum's subtraction would remove anyway)
    # so that float32 keeps the distances' own digits: against the float64 formula on the same float32 values.
    distances = 4.0 + 2.0 * torch.rand(300, 200, generator=torch.Generator().manual_seed(0))
    d = distances.double()
    normalized = (d - d.mean()) / (d.std() + 1e-6)
    torch.testing.assert_close(engine.normalize_distances(distances).double(), normalized - normalized.min(),
                               atol=1e-5, rtol=0)


def test_the_default_dense_limit_is_the_documented_one_gib_cache():
    """docs/sinkhorn.md: `streaming="auto"` caches up to `dense_limit` = 2^28 float32 entries (1 GiB), for the
    engine and the quantizer alike."""
    import inspect

    from optvq_hf import OptVQQuantizer

    assert inspect.signature(sinkhorn_assign).parameters["dense_limit"].default == 2**28
    assert OptVQQuantizer(dim=4, codebook_size=4).sinkhorn_dense_limit == 2**28
    workspace = engine.SinkhornWorkspace()  # a small problem under the default: cached in the workspace
    sinkhorn_assign(torch.randn(50, 4), torch.randn(8, 4), workspace=workspace)
    assert workspace.buffer.numel() == 50 * 8


def test_a_workspace_keeps_its_buffer_for_a_call_of_the_same_size():
    workspace = engine.SinkhornWorkspace()
    generator = torch.Generator().manual_seed(0)
    features, codebook = torch.randn(120, 4, generator=generator), torch.randn(10, 4, generator=generator)
    sinkhorn_assign(features, codebook, workspace=workspace)
    buffer = workspace.buffer
    assert buffer.numel() == 120 * 10
    assert torch.equal(sinkhorn_assign(features, codebook, workspace=workspace), sinkhorn_assign(features, codebook))
    assert workspace.buffer is buffer  # the same tensor, not a fresh allocation of the same size


def test_a_process_group_without_torch_distributed_running_assigns_locally():
    """`process_group="world"` (or a quantizer's sync) in a process where torch.distributed is not initialized: the
    rows of this process alone, with no collective."""
    import torch.distributed as dist

    from optvq_hf import OptVQQuantizer

    assert not dist.is_initialized()
    generator = torch.Generator().manual_seed(0)
    features, codebook = torch.randn(90, 4, generator=generator), torch.randn(12, 4, generator=generator)
    for streaming in (False, True):
        assert torch.equal(sinkhorn_assign(features, codebook, process_group="world", streaming=streaming),
                           sinkhorn_assign(features, codebook))
    torch.testing.assert_close(sinkhorn_plan(features, codebook, process_group="world"),
                               sinkhorn_plan(features, codebook))
    quantizer = OptVQQuantizer(dim=4, codebook_size=12).train()
    assert quantizer.sync_group() is None


def test_float32_operands_are_rescaled_by_their_largest_magnitude():
    """The engine rescales centred float32 operands by a power of two set by their largest |entry|, so squared
    distances neither overflow (1e25) nor underflow (1e-30): nearest codes against float64 `cdist`, the "all"
    assignment (scale-free above the 1e-6 of Eq. 12) against the unscaled one, even with exact zeros among the
    entries; features 1e20 away from unit codes (all distances tie in float32) still give a finite plan."""
    generator = torch.Generator().manual_seed(1)
    half = torch.randn(8, 6, generator=generator)
    half[:, 0] = 0.0
    codebook = torch.cat([half, -half])  # mean exactly 0: the centred operands keep their exact zeros
    features = torch.randn(100, 6, generator=generator)
    features[:, 0] = 0.0
    unscaled = sinkhorn_assign(features, codebook)
    for scale in (1e-30, 1e-20, 1e15, 1e25):
        for offset in (0.0, 3.0):  # features on one side of the codebook
            rows, codes = (features + offset) * scale, codebook * scale
            expected = torch.cdist(rows.double(), codes.double()).argmin(1)
            assert torch.equal(euclidean_argmin(rows, codes), expected), (scale, offset)
        if scale > 1:
            assert torch.equal(sinkhorn_assign(features * scale, codebook * scale), unscaled), scale
    far = features + 1e20
    plan = sinkhorn_plan(far, codebook)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(1), torch.ones(len(far)))
    for streaming in (False, True):
        ids = sinkhorn_assign(far, codebook, streaming=streaming)
        assert int(ids.min()) >= 0 and int(ids.max()) < len(codebook)


def test_features_equal_to_codes_choose_them_on_the_matmul_path():
    # |z|^2 - 2 z.c + |c|^2 rounds to tiny negatives where z == c: clamped at 0 before the square root (else NaN)
    generator = torch.Generator().manual_seed(0)
    codebook = torch.randn(16, 8, generator=generator)
    features = torch.cat([codebook, torch.randn(50, 8, generator=generator)])
    assert torch.equal(sinkhorn_assign(features, codebook)[:16], torch.arange(16))
    assert torch.isfinite(sinkhorn_plan(features, codebook)).all()


@pytest.mark.parametrize("normalization", ["all", "dim", "none"])
@pytest.mark.parametrize("rows,codes", [(1, 2), (1, 8), (2, 2), (3, 50)])
def test_soft_plan_of_a_few_rows_is_the_reference_plan(rows, codes, normalization):
    generator = torch.Generator().manual_seed(rows * 100 + codes)
    features, codebook = torch.randn(rows, 3, generator=generator), torch.randn(codes, 3, generator=generator)
    for num_iters in (0, 1, 3):
        plan = sinkhorn_plan(features, codebook, 10.0, num_iters, normalization)
        expected = reference_equipartition_plan(features, codebook, 10.0, num_iters, normalization)
        torch.testing.assert_close(plan.double(), expected, atol=1e-5, rtol=0)
        guarded = sinkhorn_plan(features, codebook, 10.0, num_iters, normalization, marginal_guard=1e-8)
        expected = torch.softmax(reference_sinkhorn_log_plan(features, codebook, 10.0, num_iters, normalization), 1)
        torch.testing.assert_close(guarded.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", [1e-6, 3e-7])
def test_the_1e6_in_the_all_normalization_is_in_distance_units(scale):
    # Eq. (12) divides by std(D) + 1e-6 in the distances' own units: at a scale of 1e-6 the 1e-6 is as large as the
    # spread, and the engine (which works on 2^k-rescaled distances) must add it in the same units.
    generator = torch.Generator().manual_seed(0)
    features, codebook = torch.randn(200, 3, generator=generator), torch.randn(24, 3, generator=generator)
    features, codebook = features * scale, codebook * scale
    for streaming in (False, True):
        ids = sinkhorn_assign(features, codebook, streaming=streaming)
        expected = reference_sinkhorn_log_plan(features, codebook)
        assert_near_optimal(ids, expected, 1e-3)
    plan = sinkhorn_plan(features, codebook)
    torch.testing.assert_close(plan.double(), reference_equipartition_plan(features, codebook), atol=1e-4, rtol=0)


@pytest.mark.parametrize("normalization", ["all", "dim", "none"])
def test_float64_inputs_within_float32s_range_work_with_every_normalization(normalization):
    # Only magnitudes outside float32's range are rescaled (and refused for "dim" / "none", whose scale matters):
    # float64 inputs of ordinary magnitudes give their float32 values' results, all-zero ones code 0 everywhere.
    generator = torch.Generator().manual_seed(0)
    for scale in (1e-3, 1.0, 1e3):
        features = torch.randn(60, 3, generator=generator, dtype=torch.float64) * scale
        codebook = torch.randn(10, 3, generator=generator, dtype=torch.float64) * scale
        expected = sinkhorn_assign(features.float(), codebook.float(), normalization=normalization)
        assert torch.equal(sinkhorn_assign(features, codebook, normalization=normalization), expected)
        torch.testing.assert_close(sinkhorn_plan(features, codebook, normalization=normalization),
                                   sinkhorn_plan(features.float(), codebook.float(), normalization=normalization))
    zeros = torch.zeros(5, 3, dtype=torch.float64)
    assert torch.equal(sinkhorn_assign(zeros, zeros[:4], normalization=normalization), torch.zeros(5, dtype=torch.long))


def test_nearest_code_of_one_row_and_of_one_dimension():
    codebook = torch.tensor([[0.0], [1.0], [5.0]])
    rows = torch.tensor([[4.0], [0.9], [-1.0]])
    assert euclidean_argmin(rows, codebook).tolist() == [2, 1, 0]  # d = 1, three codes
    for row, expected in zip(rows, [2, 1, 0]):
        assert euclidean_argmin(row[None], codebook).tolist() == [expected]  # a single row
    # the Sinkhorn assignment of one-dimensional features (d = 1 is not "one code")
    features = torch.linspace(-2.0, 7.0, 40)[:, None]
    for normalization in ("all", "dim", "none"):
        expected = reference_sinkhorn_log_plan(features, codebook, normalization=normalization).argmax(1)
        assert torch.equal(sinkhorn_assign(features, codebook, normalization=normalization), expected)
        assert expected.unique().numel() == 3


def test_auto_caches_up_to_the_dense_limit_and_streams_above_it():
    # streaming="auto" caches when N * K <= dense_limit (the cache lives in the workspace) and streams above it (the
    # workspace stays untouched); both give the same ids.
    generator = torch.Generator().manual_seed(0)
    features, codebook = torch.randn(200, 4, generator=generator), torch.randn(50, 4, generator=generator)
    expected = sinkhorn_assign(features, codebook, streaming=False)
    for dense_limit, cached in ((200 * 50, True), (200 * 50 - 1, False), (100, False), (10**9, True)):
        workspace = engine.SinkhornWorkspace()
        ids = sinkhorn_assign(features, codebook, dense_limit=dense_limit, workspace=workspace)
        assert torch.equal(ids, expected)
        assert (workspace.buffer is not None) == cached, dense_limit


@pytest.mark.parametrize("normalization", ["dim", "none"])
def test_float64_inputs_are_refused_exactly_outside_two_to_the_60(normalization):
    """docs/sinkhorn.md: float64 inputs whose largest |entry| lies outside [2^-60, 2^60] are rescaled for "all" and
    refused for "dim" / "none" (whose distances' scale matters); on the bounds they are the float32 values' result."""
    generator = torch.Generator().manual_seed(0)
    features = torch.rand(40, 3, generator=generator, dtype=torch.float64) * 0.5
    codebook = torch.rand(6, 3, generator=generator, dtype=torch.float64) * 0.5
    features[0, 0] = 1.0  # the largest |entry| of both operands
    for bound, beyond in ((2.0**60, 1.5 * 2.0**60), (2.0**-60, 0.75 * 2.0**-60)):
        rows, codes = features * bound, codebook * bound
        expected = sinkhorn_assign(rows.float(), codes.float(), normalization=normalization)
        assert torch.equal(sinkhorn_assign(rows, codes, normalization=normalization), expected), bound
        for function in (sinkhorn_assign, sinkhorn_plan):
            with pytest.raises(ValueError, match="outside float32's range"):
                function(features * beyond, codebook * beyond, normalization=normalization)
        # "all" is scale-free: the same ids at any magnitude
        assert torch.equal(sinkhorn_assign(features * beyond, codebook * beyond), sinkhorn_assign(features, codebook))


def test_a_call_without_rows_leaves_the_workspace_unallocated():
    # no rows, no plan-sized buffer: the workspace stays empty (the cached path allocates only for rows it holds)
    codebook = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    workspace = engine.SinkhornWorkspace()
    assert sinkhorn_assign(torch.zeros(0, 4), codebook, workspace=workspace).shape == (0,)
    potentials = engine.sinkhorn_plan_potentials(torch.zeros(0, 4), codebook, workspace=workspace)
    assert potentials.code_potentials.shape == (8,)
    assert workspace.buffer is None


def test_plan_potentials_with_the_published_guards_give_the_guarded_plan():
    # marginal_guard=1e-8 (the published guards): three codes 3x farther, whose column totals fall to where the
    # guard decides their share (0.5 apart from the plan of a guard of 3e-12 or 0), as in the float64 guarded plan;
    # the guard-free potentials give them their full share (the exact equipartition plan)
    features, codebook = _far_codes(rows=200, codes=32, factor=3.0)
    distances = torch.cdist(features.double(), codebook.double())
    for guard, expected in ((1e-8, torch.softmax(reference_sinkhorn_log_plan(features, codebook), dim=1)),
                            (0.0, reference_equipartition_plan(features, codebook))):
        potentials = engine.sinkhorn_plan_potentials(features, codebook, marginal_guard=guard)
        rebuilt = torch.softmax(-potentials.distance_scale * distances + potentials.code_potentials, dim=1)
        torch.testing.assert_close(rebuilt, expected, atol=1e-4, rtol=0)


def test_the_all_normalizations_spread_is_exact_where_distances_barely_vary():
    """The "all" normalization divides by std(D): where every distance is nearly the same (features far from the
    codebook, features at the centre of codes on a sphere, one far row), the mean is 100x the spread and a sum of
    squares around the wrong point would cancel away float32's digits. The scale (epsilon / (std + 1e-6)) and the plan
    against float64."""
    generator = torch.Generator().manual_seed(0)
    codebook = torch.randn(16, 8, generator=generator)
    far = torch.randn(150, 8, generator=generator) + 60.0
    centre = torch.randn(150, 8, generator=generator) * 0.02
    sphere = torch.randn(16, 8, generator=generator)
    sphere = 3.0 * sphere / sphere.norm(dim=1, keepdim=True)
    one_far_row = torch.randn(1, 8, generator=generator) + 60.0
    for features, codes, tolerance in ((far, codebook, 2e-5), (centre, sphere, 2e-5), (one_far_row, codebook, 1e-4)):
        distances = torch.cdist(features.double(), codes.double())
        assert float(distances.mean() / distances.std()) > 50
        potentials = engine.sinkhorn_plan_potentials(features, codes)
        assert potentials.distance_scale == pytest.approx(10.0 / (float(distances.std()) + 1e-6), rel=tolerance)
        torch.testing.assert_close(sinkhorn_plan(features, codes).double(),
                                   reference_equipartition_plan(features, codes), atol=1e-4, rtol=0)


def test_streamed_guards_with_every_feature_far_from_every_code():
    # "none" with every distance above 3: the initial plan's total (N K e^-10D) is far below the published 1e-8
    # guard, which then decides the first normalization; the streaming path reproduces the guarded algorithm
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(300, 3, generator=generator) * 0.7 + 4.0
    codebook = torch.randn(40, 3, generator=generator)
    expected = reference_sinkhorn_log_plan(features, codebook, normalization="none").argmax(1)
    for streaming in (True, False):
        assert torch.equal(sinkhorn_assign(features, codebook, normalization="none", streaming=streaming), expected)


def test_soft_plan_at_a_large_epsilon_stays_within_float32_of_the_reference():
    # epsilon 1e3: logits of thousands of nats, where the exact passes keep each row's logits relative to its own
    # smallest distance (anything else costs float32 digits: 1.9e-4 off when they are taken relative to -pivot)
    generator = torch.Generator().manual_seed(2)
    features, codebook = torch.randn(200, 2, generator=generator) * 1.5 + 0.3, torch.randn(40, 2, generator=generator)
    plan = sinkhorn_plan(features, codebook, 1e3, 5, "all")
    torch.testing.assert_close(plan.double(), reference_equipartition_plan(features, codebook, 1e3, 5, "all"),
                               atol=5e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------------------
# Where float32 and the guards leave least room: code potentials as the recursion defines them, plans far from the
# codebook with distances that float32 holds exactly, the guards after a kernel rebuild and at an initial total of
# 1e-8, against float64 transcriptions of the published recursion.
# ------------------------------------------------------------------------------------------------------------------
def _recursion_code_potentials(features, codebook, epsilon, num_iters, normalization, guard):
    """The published recursion in the float64 log domain with `guard` added to every total (0: none), tracking the
    cumulative code scalings b: Q = exp(-epsilon A) / (sum + guard), then per iteration the code normalization (b
    takes its log factor) and, except after the last, the row normalization."""
    log_plan = -epsilon * reference_cost(features, codebook, normalization)
    num_rows, num_codes = log_plan.shape
    log_guard = torch.tensor(math.log(guard) if guard > 0 else -math.inf, dtype=torch.float64)
    log_plan = log_plan - torch.logaddexp(torch.logsumexp(log_plan.flatten(), 0), log_guard)
    potentials = torch.zeros(num_codes, dtype=torch.float64)
    for iteration in range(num_iters):
        step = -torch.logaddexp(torch.logsumexp(log_plan, 0), log_guard) - math.log(num_codes)
        log_plan, potentials = log_plan + step, potentials + step
        if iteration < num_iters - 1:
            log_plan = log_plan - torch.logaddexp(torch.logsumexp(log_plan, 1, keepdim=True), log_guard)
            log_plan = log_plan - math.log(num_rows)
    return potentials


@pytest.mark.parametrize("normalization,far,guard", [("all", 1.0, 0.0), ("all", 1.0, 1e-8), ("none", 50.0, 0.0),
                                                     ("dim", 50.0, 0.0), ("none", 50.0, 1e-8)])
def test_plan_potentials_are_the_recursions_code_potentials(normalization, far, guard):
    """PlanPotentials.code_potentials are "the code potentials after the last code normalization": the cumulative log
    scalings b of the recursion, not just any vector that gives the same rows (a constant shift gives the same
    rows, but not these values). Plain codes (the kernel passes) and three codes 50x farther (their totals beyond
    float32's exp range: the guard-free plan takes the exact passes), against float64. The tolerance is 8 float32
    rounding steps of the largest logit, epsilon * max A (float32 logits: ~6e-6 nats for plain codes, ~1e-3 with the
    far codes' costs of ~150)."""
    generator = torch.Generator().manual_seed(0)
    features, codebook = torch.randn(300, 4, generator=generator), torch.randn(64, 4, generator=generator)
    codebook[-3:] *= far
    for num_iters in (1, 5):
        potentials = sinkhorn_plan_potentials(features, codebook, 10.0, num_iters, normalization, marginal_guard=guard)
        expected = _recursion_code_potentials(features, codebook, 10.0, num_iters, normalization, guard)
        largest_logit = 10.0 * float(reference_cost(features, codebook, normalization).max())
        tolerance = 8 * largest_logit * 2.0**-24
        torch.testing.assert_close(potentials.code_potentials, expected, atol=tolerance, rtol=0)


def _far_from_the_codebook(extra_code=None):
    """One-dimensional features within 1/64 of the origin (multiples of 1/512) and codes near +-4000 (multiples of
    1/64, symmetric so that their mean is exactly 0): every distance is exact in float32 (squares below 2^24), yet
    at epsilon 197.3 ("none") every logit is near -790,000 nats, whose float32 spacing is 1/16."""
    near = 4000.0 + torch.arange(9, dtype=torch.float32) / 64
    if extra_code is not None:
        near = torch.cat([near, torch.tensor([extra_code])])
    codebook = torch.cat([-near.flip(0), near])[:, None]
    generator = torch.Generator().manual_seed(0)
    features = (torch.randint(-8, 9, (8,), generator=generator).float() / 512)[:, None]
    return features, codebook


@pytest.mark.parametrize(
    "extra_code",
    [
        None,  # every code within reach of the kernel: the kernel passes
        4001.0,  # +-4001: 170 nats beyond every row's best, beyond what the kernel can vouch for: the exact passes
        # +-4000.84765625: ~166 nats beyond, where the kernel's total for it is 75-85 nats below its largest: within
        # 87 nats (the floored entries' reach) but not 17 nats clear of what they add, so not trusted
        4000.0 + 434 / 512,
        # +-4000.625: ~100 nats beyond, trusted, and its potential drifts past 60 nats: the kernel is rebuilt (from
        # row differences, as pass 1 builds it: at the logits' absolute size float32 would lose 1e-3 of the plan)
        4000.625,
    ],
)
def test_far_from_the_codebook_the_plan_keeps_float32_precision(extra_code):
    """Logits of -790,000 nats whose differences float32 holds exactly: every quantity that carries a row's or a
    code's absolute level (row minima, offsets, column maxima) must stay in float64, where a float32 copy of it
    would be off by up to 1/32 nat. The plan against float64 within 2e-5 (its own float32 rounding is ~1e-6:
    logits within each row span at most 30 nats)."""
    features, codebook = _far_from_the_codebook(extra_code)
    for num_iters in (1, 2):
        plan = sinkhorn_plan(features, codebook, 197.3, num_iters, "none")
        expected = reference_equipartition_plan(features, codebook, 197.3, num_iters, "none")
        torch.testing.assert_close(plan.double(), expected, atol=2e-5, rtol=0)


def test_far_from_the_codebook_a_rebuilt_kernel_keeps_float32_precision_under_the_all_normalization():
    """"all" divides the same distances (~4000) by their spread (~0.05), so at epsilon 30 the logits are again of
    order 10^6 nats, and the cache holds lambda D - pivot: with a code 1/4 unit beyond the others, whose potential
    drifts past the rebuild threshold (without the rebuild the plan is 0.1 off), the rebuilt kernel must be built from
    each row's distances relative to its smallest (the cached minimum plus the pivot). Within 2e-5 of float64."""
    features, codebook = _far_from_the_codebook(4000.25)
    for num_iters in (1, 2):
        plan = sinkhorn_plan(features, codebook, 30.0, num_iters, "all")
        expected = reference_equipartition_plan(features, codebook, 30.0, num_iters, "all")
        torch.testing.assert_close(plan.double(), expected, atol=2e-5, rtol=0)


def test_the_guarded_plan_after_the_kernel_is_rebuilt():
    """"all" with one code 60 units beyond 63 others and every feature ~30 from all of them: the far code's potential
    climbs by up to 14 nats per iteration (capped by its 1e-8 guard) until the cached kernel is rebuilt, and the
    rebuilt kernel's row scales carry the cost's shift (the minimum distance, here ~80 nats of logits): the rows'
    totals then meet their 1e-8 guards on the right scale. The guarded plan against float64."""
    generator = torch.Generator().manual_seed(0)
    codebook = torch.randn(64, 4, generator=generator) * 0.3
    codebook[-1] = torch.tensor([60.0, 0.0, 0.0, 0.0])
    features = torch.randn(100, 4, generator=generator) * 0.3 + torch.tensor([-30.0, 0.0, 0.0, 0.0])
    plan = sinkhorn_plan(features, codebook, 10.0, 8, "all", marginal_guard=1e-8)
    expected = torch.softmax(reference_sinkhorn_log_plan(features, codebook, 10.0, 8, "all"), dim=1)
    torch.testing.assert_close(plan.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("block_size", [7, 64, None])
def test_the_exact_passes_over_blocks_of_any_size_raise_no_warning(block_size):
    """The exact passes (codes beyond float32's reach) write each block into a scratch buffer with `out=`: a buffer
    of the wrong shape would be resized by torch with a deprecation warning (an error in future torch). Blocks of 7
    rows leave a last block of 6, 64 one of 44, None one block; the plans are the same."""
    generator = torch.Generator().manual_seed(0)
    features, codebook = torch.randn(300, 4, generator=generator), torch.randn(40, 4, generator=generator)
    codebook[-3:] *= 50.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = sinkhorn_plan(features, codebook, 10.0, 3, "none", block_size=block_size)
        potentials = sinkhorn_plan_potentials(features, codebook, 10.0, 3, "none", block_size=block_size)
    torch.testing.assert_close(plan.double(), reference_equipartition_plan(features, codebook, 10.0, 3, "none"),
                               atol=1e-4, rtol=0)
    rebuilt = torch.softmax(-potentials.distance_scale * torch.cdist(features.double(), codebook.double())
                            + potentials.code_potentials, dim=1)
    torch.testing.assert_close(rebuilt, plan.double(), atol=1e-4, rtol=0)


def test_assignments_where_the_initial_total_meets_the_guard():
    """Features shifted until the initial plan's total is e^0.8 times the published 1e-8 guard: its normalization
    divides by total + 1e-8 (not by the larger of the two), which moves the code guards' share. The streamed and
    the cached assignments against the float64 published plan (a maximum instead of the sum moves 11 rows)."""
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(200, 2, generator=generator)
    codebook = torch.randn(16, 2, generator=generator)
    codebook[-4:] *= 3
    features = features + 4.75
    log_total = float(torch.logsumexp(-6.0 * reference_cost(features, codebook, "none").flatten(), 0))
    assert abs(log_total - math.log(1e-8)) < 1.0
    expected = reference_sinkhorn_log_plan(features, codebook, 6.0, 1, "none").argmax(1)
    for streaming in (True, False):
        assert torch.equal(sinkhorn_assign(features, codebook, 6.0, 1, "none", streaming=streaming), expected)


def test_the_dense_log_plan_follows_the_literal_recursion():
    """sinkhorn_log_plan promises the reference's order and its +1e-8 guards: against the recursion written as in
    the reference code (exponential domain, float64: Q / (Q.sum() + 1e-8), then columns and rows, the last row
    normalization left out), on costs whose initial total is 1 and 1e-8, to 1e-12 in the log domain."""
    generator = torch.Generator().manual_seed(0)
    cost = torch.rand(30, 6, generator=generator, dtype=torch.float64)
    for offset in (0.0, 1.0):
        # shift the cost so that the initial total sum(exp(-epsilon * cost)) is 1 (offset 0) or 1e-8 (offset 1)
        shifted = cost + (torch.logsumexp(-4.0 * cost.flatten(), 0) - offset * math.log(1e8)) / 4.0
        for num_iters in (0, 1, 3):
            plan = torch.exp(-4.0 * shifted)
            plan = plan / (plan.sum() + 1e-8)
            for iteration in range(num_iters):
                plan = plan / (plan.sum(0, keepdim=True) + 1e-8) / 6
                if iteration < num_iters - 1:
                    plan = plan / (plan.sum(1, keepdim=True) + 1e-8) / 30
            torch.testing.assert_close(sinkhorn_log_plan(shifted, 4.0, num_iters), plan.log(), atol=1e-12, rtol=0)
