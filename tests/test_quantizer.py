"""The quantizer family used on its own: layouts, heads, losses, straight-through, dtypes, errors."""

import pytest
import torch

from optvq_hf import OptVQQuantizer, VectorQuantizer
from reference_optvq import reference_quantize, reference_sinkhorn_assign


def _quantizer(**kwargs):
    torch.manual_seed(0)
    defaults = dict(dim=8, codebook_size=16, num_heads=2)
    return OptVQQuantizer(**{**defaults, **kwargs})


def test_image_layout_and_head_split_match_reference():
    quantizer = _quantizer()
    features = torch.randn(2, 8, 3, 5)
    for mode, assignment in ((True, "sinkhorn"), (False, "nearest")):
        quantizer.train(mode)
        out = quantizer(features)
        quantized, token_ids = reference_quantize(features, quantizer.codebook.detach(), 2, assignment)
        assert out.token_ids.shape == (2, 2, 3, 5) and out.token_ids.dtype == torch.long
        assert torch.equal(out.token_ids, token_ids)
        torch.testing.assert_close(out.quantized.double(), quantized, atol=1e-6, rtol=1e-6)


def test_head_k_owns_channels_k_times_d():
    quantizer = _quantizer().eval()
    features = torch.randn(1, 8, 1, 1)
    out = quantizer(features)
    codebook = quantizer.codebook.detach()
    for head in range(2):
        chunk = features[0, head * 4:(head + 1) * 4, 0, 0]
        expected = torch.cdist(chunk[None], codebook).argmin()
        assert out.token_ids[0, head, 0, 0] == expected
        torch.testing.assert_close(out.quantized[0, head * 4:(head + 1) * 4, 0, 0], codebook[expected])


def test_sequence_layout():
    quantizer = _quantizer().eval()
    features = torch.randn(3, 7, 8)
    out = quantizer(features)
    assert out.quantized.shape == (3, 7, 8) and out.token_ids.shape == (3, 7, 2)
    image_out = quantizer(features.reshape(3, 7, 1, 8).permute(0, 3, 1, 2))
    assert torch.equal(image_out.token_ids.permute(0, 2, 3, 1).reshape(3, 7, 2), out.token_ids)
    torch.testing.assert_close(quantizer.embed_tokens(out.token_ids), out.quantized)


def test_training_sinkhorn_runs_over_all_rows_jointly():
    quantizer = _quantizer().train()
    features = torch.randn(4, 8, 2, 2)
    out = quantizer(features)
    rows = features.permute(0, 2, 3, 1).reshape(-1, 4)
    expected = reference_sinkhorn_assign(rows, quantizer.codebook.detach())
    assert torch.equal(out.token_ids.permute(0, 2, 3, 1).reshape(-1), expected)


def test_loss_weights_and_straight_through():
    quantizer = _quantizer(commitment_weight=1.0, beta=0.25).train()
    features = torch.randn(2, 8, 2, 2, requires_grad=True)
    out = quantizer(features)
    chosen = quantizer.embed_tokens(out.token_ids).detach()
    expected = 1.25 * torch.mean((features.detach() - chosen) ** 2)
    torch.testing.assert_close(out.loss, expected)
    # straight-through: d quantized / d features is the identity
    (out.quantized * torch.arange(out.quantized.numel()).reshape(out.quantized.shape)).sum().backward()
    torch.testing.assert_close(features.grad, torch.arange(features.numel(), dtype=torch.float32).reshape(features.shape))


def test_commitment_term_reaches_encoder_and_beta_term_reaches_codebook():
    quantizer = _quantizer(commitment_weight=1.0, beta=0.0).train()
    features = torch.randn(2, 8, 2, 2, requires_grad=True)
    quantizer(features).loss.backward()
    assert features.grad.abs().sum() > 0
    assert quantizer.embedding.weight.grad is None or quantizer.embedding.weight.grad.abs().sum() == 0
    quantizer = _quantizer(commitment_weight=0.0, beta=1.0).train()
    features = torch.randn(2, 8, 2, 2, requires_grad=True)
    quantizer(features).loss.backward()
    assert features.grad is None or features.grad.abs().sum() == 0
    assert quantizer.embedding.weight.grad.abs().sum() > 0 and quantizer.projection.weight.grad.abs().sum() > 0


def test_computes_in_float32_under_autocast_and_returns_input_dtype():
    quantizer = _quantizer().train()
    features = torch.randn(2, 8, 4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(features)
    assert out.quantized.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    reference = quantizer(features.float())
    assert torch.equal(out.token_ids, reference.token_ids)


def test_statistics():
    quantizer = _quantizer(codebook_size=4, num_heads=1, dim=2).eval()
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.eye(4, 2) * 10)
        quantizer.projection.weight.copy_(torch.eye(2))
        quantizer.projection.bias.zero_()
    features = torch.tensor([[10.0, 0.0], [10.0, 0.1], [0.0, 10.0], [0.1, 10.0]]).reshape(1, 4, 2)
    out = quantizer(features)
    assert out.token_ids.flatten().tolist() == [0, 0, 1, 1]
    assert out.code_counts.tolist() == [2, 2, 0, 0]
    torch.testing.assert_close(out.codebook_usage, torch.tensor(0.5))
    torch.testing.assert_close(out.perplexity, torch.tensor(2.0))


def test_vector_quantizer_is_nearest_in_training():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=4, codebook_size=8, num_heads=1).train()
    features = torch.randn(2, 4, 3, 3)
    out = vq(features)
    _, expected = reference_quantize(features, vq.codebook.detach(), 1, "nearest")
    assert torch.equal(out.token_ids, expected)


def test_without_projection_codebook_is_the_table():
    quantizer = _quantizer(use_projection=False)
    assert quantizer.projection is None
    torch.testing.assert_close(quantizer.codebook, quantizer.embedding.weight)


def test_identical_features_stay_finite():
    quantizer = _quantizer().train()
    out = quantizer(torch.zeros(2, 8, 4, 4))
    assert torch.isfinite(out.quantized).all() and torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "features,match",
    [
        (torch.randn(2, 6, 4, 4), "expects 8 channels"),
        (torch.randn(8), r"\(B, C, H, W\) or \(B, T, C\)"),
        (torch.full((1, 8, 2, 2), float("nan")), "NaN or Inf"),
        (torch.ones(1, 8, 2, 2, dtype=torch.long), "floating point"),
    ],
)
def test_bad_features_raise(features, match):
    with pytest.raises(ValueError, match=match):
        _quantizer()(features)


def test_bad_construction_and_token_ids_raise():
    with pytest.raises(ValueError, match="divisible"):
        OptVQQuantizer(dim=10, codebook_size=4, num_heads=3)
    with pytest.raises(ValueError, match="inference_assignment"):
        OptVQQuantizer(dim=4, codebook_size=4, inference_assignment="random")
    quantizer = _quantizer()
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        quantizer.embed_tokens(torch.full((1, 2, 2, 2), 16))
    with pytest.raises(ValueError, match="num_heads=2"):
        quantizer.embed_tokens(torch.zeros(1, 3, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        quantizer.embed_tokens(torch.zeros(1, 2, 2, 2))
