"""The quantizer's edges that the main tests do not reach: nearest codes far from the origin, inputs that are not
tensors, ... (each written against a mutant that survived tests/test_quantizer.py; see docs/testing.md)."""

import pytest
import torch

from optvq_hf import OptVQQuantizer, VectorQuantizer
from reference_optvq import reference_sinkhorn_assign


@pytest.mark.parametrize("quantizer_class", [OptVQQuantizer, VectorQuantizer])
def test_nearest_codes_far_from_the_origin_are_exact(quantizer_class):
    # Features and codes near 1000 in every coordinate: ||c||^2 - 2 z.c in float32 loses the distances' digits (the
    # dense formula picks a wrong code for about a third of these rows); the blockwise path centres first.
    generator = torch.Generator().manual_seed(0)
    codes = torch.randn(64, 8, generator=generator) + 1000.0
    rows = torch.randn(500, 8, generator=generator) + 1000.0
    quantizer = quantizer_class(dim=8, codebook_size=64, use_projection=False).eval()
    quantizer.set_codebook(codes)
    token_ids = quantizer(rows[None]).token_ids.reshape(-1)
    assert torch.equal(token_ids, torch.cdist(rows.double(), codes.double()).argmin(1))
    if quantizer_class is OptVQQuantizer:  # the training assignment too: the engine, not the dense formula
        token_ids = quantizer.train()(rows[None]).token_ids.reshape(-1)
        assert int((token_ids != reference_sinkhorn_assign(rows, codes)).sum()) <= 1  # a float32 near-tie at most


@pytest.mark.parametrize("features", [[[0.0] * 8], None, 3.0])
def test_features_that_are_not_tensors_raise_a_value_error_naming_their_type(features):
    with pytest.raises(ValueError, match=type(features).__name__):
        OptVQQuantizer(dim=8, codebook_size=4)(features)


@pytest.mark.parametrize("quantization_loss", ["l2", "l1", "ce"])
@pytest.mark.parametrize("quantizer_type", ["optvq", "vq", "otvae"])
def test_an_empty_batch_gives_zero_loss_and_a_zero_codebook_gradient(quantizer_type, quantization_loss):
    """An empty batch (a rank without rows) has loss 0, and its backward still reaches the codebook with a zero
    gradient (a gradient that is None on one rank would stall DDP's all-reduce of the others)."""
    from optvq_hf import get_quantizer_class

    quantizer = get_quantizer_class(quantizer_type)(dim=8, codebook_size=16, num_heads=2,
                                                    quantization_loss=quantization_loss).train()
    output = quantizer(torch.zeros(0, 8, 4, 4, requires_grad=True))
    assert output.loss.item() == 0.0 and output.token_ids.shape == (0, 2, 4, 4)
    output.loss.backward()
    for parameter in (quantizer.embedding.weight, quantizer.projection.weight):
        assert parameter.grad is not None and torch.equal(parameter.grad, torch.zeros_like(parameter))


def test_a_vector_quantizer_uses_the_documented_loss_weights_by_default():
    # CodebookQuantizer's own defaults (VectorQuantizer has no constructor of its own): commitment 1.0, beta 0.25,
    # l2 loss: loss = (1.0 + 0.25) * mean((z - c)^2) in value.
    torch.manual_seed(0)
    quantizer = VectorQuantizer(dim=4, codebook_size=8)
    assert (quantizer.commitment_weight, quantizer.beta, quantizer.num_heads) == (1.0, 0.25, 1)
    assert quantizer.sync_across_ranks and quantizer.projection is not None and quantizer.quantization_loss == "l2"
    features = torch.randn(2, 4, 3, 3)
    output = quantizer(features)
    rows = features.permute(0, 2, 3, 1).reshape(-1, 4).double()
    codes = quantizer.codebook.detach().double()[output.token_ids.reshape(-1)]
    torch.testing.assert_close(output.loss.double(), 1.25 * ((rows - codes) ** 2).mean(), atol=1e-6, rtol=1e-5)
