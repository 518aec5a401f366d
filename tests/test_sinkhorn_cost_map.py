"""The engine's cost map (`_cost_map`, pass 0) where the data's extent is far larger than the distances that decide
the plan: one far row sets the power-of-two scale, so the other rows' distances to their codes are ~1e-4 of the
largest entry. The fixed-scale normalizations ("none", "dim") cache the distances with no pivot subtracted, so those
small distances keep their float32 digits (a pivot of order 1 subtracted in the cache would round them to ~1e-7 of
1)."""

import pytest
import torch

from optvq_hf.sinkhorn import sinkhorn_plan
from reference_optvq import reference_equipartition_plan


@pytest.mark.parametrize("normalization, epsilon", [("none", 10.0), ("dim", 30.0)])
def test_a_far_row_leaves_the_other_rows_plan_at_float32_accuracy(normalization, epsilon):
    generator = torch.Generator().manual_seed(0)
    codebook = torch.randn(16, 8, generator=generator)
    features = torch.randn(200, 8, generator=generator)
    features[0] = 0.0
    features[0, 0] = 1e4  # the far row: the largest entry, so the others' distances are ~1e-4 in the engine's units
    codebook[0, 0] = codebook[:, 0].max() + 3.0  # its nearest code by 3 units: a one-hot row, whatever its rounding
    plan = sinkhorn_plan(features, codebook, epsilon, 5, normalization)
    expected = reference_equipartition_plan(features, codebook, epsilon, 5, normalization)
    # ~2e-6 here; a pivot of the RMS distance (or of 1) subtracted in the cache gives 1e-4 (2e-3)
    assert float((plan[1:].double() - expected[1:]).abs().max()) < 2e-5
    assert float((plan[0].double() - expected[0]).abs().max()) < 1e-6  # the far row itself: all on code 0
