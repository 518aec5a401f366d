"""`sinkhorn_assign` against an independent float64 implementation of the published algorithm."""

import math

import pytest
import torch

from optvq_hf import nearest_assign, sinkhorn_assign
from optvq_hf.sinkhorn import sinkhorn_plan
from reference_optvq import assert_near_optimal, reference_sinkhorn_assign, reference_sinkhorn_log_plan


def _data(num_rows, num_codes, dim, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_rows, dim, generator=generator) * scale
    codebook = torch.randn(num_codes, dim, generator=generator) * scale
    return features, codebook


@pytest.mark.parametrize("num_rows,num_codes,dim", [(64, 16, 2), (200, 64, 4), (37, 128, 8), (512, 32, 3)])
@pytest.mark.parametrize("normalization", ["all", "dim", "none"])
def test_matches_published_algorithm(num_rows, num_codes, dim, normalization):
    mismatches = 0
    total = 0
    for seed in range(3):
        features, codebook = _data(num_rows, num_codes, dim, seed)
        ours = sinkhorn_assign(features, codebook, epsilon=10.0, num_iters=5, normalization=normalization)
        reference = reference_sinkhorn_assign(features, codebook, 10.0, 5, normalization)
        assert ours.shape == (num_rows,) and ours.dtype == torch.long
        mismatches += int((ours != reference).sum())
        total += num_rows
        # a row that differs chose a code the float64 plan rates as good as the best, to float32 resolution
        log_plan = reference_sinkhorn_log_plan(features, codebook, 10.0, 5, normalization)
        assert_near_optimal(ours, log_plan, 1e-4)
    # float32 vs float64: only exact near-ties may flip.
    assert mismatches <= max(1, total // 500)


@pytest.mark.parametrize("epsilon,num_iters", [(1.0, 1), (3.0, 3), (10.0, 10), (20.0, 2)])
def test_matches_for_other_parameters(epsilon, num_iters):
    features, codebook = _data(150, 40, 4, seed=7)
    ours = sinkhorn_assign(features, codebook, epsilon=epsilon, num_iters=num_iters)
    reference = reference_sinkhorn_assign(features, codebook, epsilon, num_iters)
    assert int((ours != reference).sum()) <= 1


def test_zero_iterations_is_nearest_neighbour():
    features, codebook = _data(300, 50, 6, seed=3)
    assert torch.equal(sinkhorn_assign(features, codebook, num_iters=0), nearest_assign(features, codebook))


def test_balances_the_codebook_where_nearest_collapses():
    # All features sit near one code: nearest uses a handful of codes, the transport plan spreads over all of them.
    generator = torch.Generator().manual_seed(0)
    codebook = torch.randn(32, 4, generator=generator)
    features = codebook[0] + 0.5 * torch.randn(1024, 4, generator=generator)
    sinkhorn_codes = sinkhorn_assign(features, codebook).unique().numel()
    nearest_codes = nearest_assign(features, codebook).unique().numel()
    assert sinkhorn_codes == 32 and nearest_codes < sinkhorn_codes


def test_invariant_to_shift_and_scale_under_all_normalization():
    features, codebook = _data(128, 32, 4, seed=5)
    base = sinkhorn_assign(features, codebook)
    scaled = sinkhorn_assign(features * 1000.0 + 5.0, codebook * 1000.0 + 5.0)
    assert (base != scaled).sum() <= 1


def test_underflow_is_finite_and_sensible():
    # With normalization "none" and huge distances, exp(-eps * D) underflows to 0 in the published algorithm.
    features, codebook = _data(64, 16, 4, seed=9, scale=100.0)
    ids = sinkhorn_assign(features, codebook, normalization="none")
    assert ids.min() >= 0 and ids.max() < 16
    # With no iterations, the log-domain plan is exactly the nearest neighbour even where exp underflows.
    assert torch.equal(sinkhorn_assign(features, codebook, normalization="none", num_iters=0),
                       nearest_assign(features, codebook))


@pytest.mark.parametrize("normalization", ["all", "dim", "none"])
@pytest.mark.parametrize("num_rows,num_codes", [(1, 1), (1, 8), (8, 1), (3, 50), (2, 2)])
def test_degenerate_sizes(num_rows, num_codes, normalization):
    features, codebook = _data(num_rows, num_codes, 3, seed=1)
    log_plan = reference_sinkhorn_log_plan(features, codebook, 10.0, 5, normalization)
    for streaming in (False, True):
        ids = sinkhorn_assign(features, codebook, normalization=normalization, streaming=streaming)
        assert ids.shape == (num_rows,) and ids.dtype == torch.long
        # With one row, every code that is not limited by the 1e-8 guard has the same plan entry after the first
        # code normalization (to float32 resolution): ties; elsewhere the float64 plan's best code.
        assert_near_optimal(ids, log_plan, 1e-4)
        if num_rows > 1:
            assert torch.equal(ids, reference_sinkhorn_assign(features, codebook, normalization=normalization))
    if num_codes == 1:
        assert sinkhorn_assign(features, codebook).tolist() == [0] * num_rows


@pytest.mark.parametrize("normalization", ["all", "dim", "none"])
@pytest.mark.parametrize("dim", [3, 6])  # exact coordinate differences, and the matmul path
def test_equal_distances_give_code_zero_everywhere(normalization, dim):
    """std 0 (every distance equal): a uniform plan, code 0 for every row (the published algorithm's first maximum),
    in every path; the soft plan is uniform."""
    point = torch.zeros(16, dim)
    equidistant = torch.cat([torch.eye(dim), -torch.eye(dim)]) * 2.0  # every code at distance 2 from every row
    for features, codebook in ((torch.ones(16, dim), torch.ones(8, dim)), (point, equidistant)):
        assert reference_sinkhorn_assign(features, codebook, normalization=normalization).tolist() == [0] * 16
        for streaming in (False, True):
            for num_iters in (0, 1, 5):
                ids = sinkhorn_assign(features, codebook, num_iters=num_iters, normalization=normalization,
                                      streaming=streaming)
                assert ids.tolist() == [0] * 16, (streaming, num_iters)
        plan = sinkhorn_plan(features, codebook, normalization=normalization)
        torch.testing.assert_close(plan, torch.full_like(plan, 1 / codebook.shape[0]))


def test_quantizer_with_equal_codes_gives_code_zero():
    from optvq_hf import OptVQQuantizer

    quantizer = OptVQQuantizer(dim=8, codebook_size=16, num_heads=2, use_projection=False)
    with torch.no_grad():
        quantizer.embedding.weight.fill_(0.25)
    features = torch.randn(2, 8, 3, 3)
    for training in (True, False):
        assert quantizer.train(training)(features).token_ids.unique().tolist() == [0]


@pytest.mark.parametrize("normalization", ["dim", "none"])
@pytest.mark.parametrize("streaming", [False, True])
def test_capped_cost_scale_gives_the_nearest_code(normalization, streaming):
    """Near float32's largest values the cost scale (epsilon over the distances' power-of-two scale) would pass
    float32's range: it is capped at 1e20, where the plan is one-hot on the nearest code."""
    features, codebook = _data(300, 32, 4, seed=4, scale=3e37)
    assert torch.isfinite(features).all() and features.abs().max() > 1e38
    nearest = torch.cdist(features.double(), codebook.double()).argmin(1)
    ids = sinkhorn_assign(features, codebook, normalization=normalization, streaming=streaming, block_size=64)
    assert torch.equal(ids, nearest)




def test_gradients_are_not_tracked():
    features, codebook = _data(32, 8, 2, seed=2)
    features.requires_grad_(True)
    ids = sinkhorn_assign(features, codebook)
    assert not ids.requires_grad


@pytest.mark.parametrize(
    "features,codebook,kwargs,match",
    [
        (torch.randn(4, 3), torch.randn(5, 2), {}, "last dimension"),
        (torch.randn(4), torch.randn(5, 2), {}, r"\(N, d\)"),
        (torch.randn(4, 2), torch.randn(5, 2), {"normalization": "batch"}, "normalization"),
        (torch.randn(4, 2), torch.randn(5, 2), {"epsilon": 0.0}, "epsilon"),
        (torch.randn(4, 2), torch.randn(5, 2), {"num_iters": -1}, "num_iters"),
    ],
)
def test_bad_arguments_raise_value_error(features, codebook, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn_assign(features, codebook, **kwargs)


@pytest.mark.parametrize("function", ["sinkhorn_assign", "sinkhorn_plan", "sinkhorn_plan_potentials",
                                      "euclidean_argmin"])
@pytest.mark.parametrize(
    "features,codebook,match",
    [
        (torch.randn(4, 2), torch.randn(0, 2), "at least one code"),
        (torch.randn(4, 2), torch.randn(5, 2, 1), r"\(K, d\)"),
        (torch.randn(4, 2, 1), torch.randn(5, 2), r"\(N, d\)"),
        (torch.randn(4, 3), torch.randn(5, 2), "last dimension"),
        (torch.randn(4, 2), torch.randint(0, 3, (5, 2)), "floating point"),
        (torch.randint(0, 3, (4, 2)), torch.randn(5, 2), "floating point"),
    ],
)
def test_every_engine_entry_checks_features_and_codebook(function, features, codebook, match):
    """Each check on its own (an empty codebook with the right width, integer codes next to float features, ...)."""
    from optvq_hf import sinkhorn

    with pytest.raises(ValueError, match=match):
        getattr(sinkhorn, function)(features, codebook)
    valid = getattr(sinkhorn, function)(torch.randn(4, 2), torch.randn(5, 2))  # and valid pairs pass
    if isinstance(valid, sinkhorn.PlanPotentials):  # one potential per code
        assert valid.code_potentials.shape == (5,) and math.isfinite(valid.distance_scale)
    else:  # one token / plan row per feature
        assert valid.shape[0] == 4


@pytest.mark.parametrize("normalization", ["all", "dim", "none"])
def test_traceable_dense_path_matches_published_algorithm(normalization):
    from optvq_hf.sinkhorn import dense_nearest_assign, dense_sinkhorn_assign

    features, codebook = _data(300, 48, 4, seed=11)
    reference = reference_sinkhorn_assign(features, codebook, 10.0, 5, normalization)
    assert int((dense_sinkhorn_assign(features, codebook, normalization=normalization) != reference).sum()) <= 1
    assert torch.equal(dense_nearest_assign(features, codebook), nearest_assign(features, codebook))


@pytest.mark.parametrize("training", [True, False])
def test_compiled_quantizer_gives_the_eager_tokens(training):
    from optvq_hf import OptVQQuantizer

    torch.manual_seed(0)
    quantizer = OptVQQuantizer(dim=8, codebook_size=64, num_heads=2).train(training)
    features = torch.randn(4, 8, 6, 6)
    eager = quantizer(features)
    compiled = torch.compile(quantizer, backend="aot_eager", fullgraph=True)(features)
    assert int((compiled.token_ids != eager.token_ids).sum()) <= 1
    torch.testing.assert_close(compiled.loss, eager.loss, atol=1e-5, rtol=1e-4)


def test_the_dense_helpers_match_their_formulas():
    """`pairwise_euclidean` and `normalize_distances` (public, dense; the engine itself does not call them) against
    the formulas written out in float64: Eqs. (11)-(12) for "all", the identity for "none"."""
    from optvq_hf.sinkhorn import normalize_distances, pairwise_euclidean

    torch.manual_seed(0)
    features, codebook = torch.randn(7, 3), torch.randn(5, 3)
    distances = pairwise_euclidean(features, codebook)
    expected = ((features.double()[:, None] - codebook.double()[None]) ** 2).sum(-1).sqrt()
    torch.testing.assert_close(distances.double(), expected, rtol=1e-5, atol=1e-6)
    d = expected
    normalized = (d - d.mean()) / (d.std() + 1e-6)
    torch.testing.assert_close(normalize_distances(d), normalized - normalized.min(), rtol=1e-12, atol=1e-12)
    assert normalize_distances(d, "none") is d
    assert torch.equal(normalize_distances(torch.tensor([[3.0]])), torch.zeros(1, 1))  # one entry: no spread
    with pytest.raises(ValueError, match="normalization"):
        normalize_distances(d, "dim")


def test_workspace_repr_gives_its_buffer_size():
    from optvq_hf.sinkhorn import SinkhornWorkspace

    workspace = SinkhornWorkspace()
    assert repr(workspace) == "SinkhornWorkspace(0 MiB)"
    workspace.get(1024, 1536, "cpu")  # 1024 * 1536 float32 = 6 MiB
    assert workspace.buffer.numel() == 1024 * 1536 and repr(workspace) == "SinkhornWorkspace(6 MiB)"


@pytest.mark.parametrize("function", ["sinkhorn_plan", "sinkhorn_plan_potentials"])
@pytest.mark.parametrize("marginal_guard", [-1e-3, math.inf, math.nan])
def test_the_soft_plans_refuse_a_marginal_guard_that_is_negative_or_not_finite(function, marginal_guard):
    from optvq_hf import sinkhorn

    features, codebook = _data(16, 4, 2, seed=5)
    with pytest.raises(ValueError, match="marginal_guard"):
        getattr(sinkhorn, function)(features, codebook, marginal_guard=marginal_guard)
