"""The quantizer family used on its own: layouts, heads, losses, straight-through, dtypes, errors."""

import pytest
import torch

from optvq_hf import OptVQQuantizer, VectorQuantizer
from reference_optvq import (
    assert_near_optimal,
    reference_quantize,
    reference_sinkhorn_assign,
    reference_sinkhorn_log_plan,
)


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


def _rows_and_codes(quantizer, features, token_ids):
    """float64 rows `(N, d)` in the quantizer's order (positions in raster order, heads innermost), their token ids,
    the stored table and the codes in use, computed here from the parameters."""
    code_dim = quantizer.code_dim
    rows = features.detach().double().permute(0, 2, 3, 1).reshape(-1, code_dim)
    ids = token_ids.permute(0, 2, 3, 1).reshape(-1)
    table = quantizer.embedding.weight.detach().double()
    if quantizer.projection is None:
        return rows, ids, table, table
    weight = quantizer.projection.weight.detach().double()
    return rows, ids, table, table @ weight.T + quantizer.projection.bias.detach().double()


@pytest.mark.parametrize("use_projection", [True, False])
def test_straight_through_estimator_gives_the_codebook_no_decoder_gradient(use_projection):
    """`quantized = z + sg(c - z)`: the decoder's gradient reaches the encoder unchanged (the identity) and never
    the codebook, whose only gradient is the loss's `beta` term."""
    quantizer = _quantizer(use_projection=use_projection).train()
    features = torch.randn(2, 8, 3, 3, requires_grad=True)
    out = quantizer(features)
    # the values are the chosen codes ...
    rows, ids, _, codes = _rows_and_codes(quantizer, features, out.token_ids)
    expected = codes[ids].reshape(2, 3, 3, 8).permute(0, 3, 1, 2)
    torch.testing.assert_close(out.quantized.double(), expected, atol=1e-6, rtol=0)
    # ... and any function of them back-propagates to the features as if quantization were the identity
    upstream = torch.randn(out.quantized.shape)
    (out.quantized * upstream).sum().backward()
    assert torch.equal(features.grad, upstream)
    assert [name for name, p in quantizer.named_parameters() if p.grad is not None] == []


@pytest.mark.parametrize("use_projection", [True, False])
def test_loss_and_its_gradients_match_a_float64_derivation(use_projection):
    """loss = commitment_weight * mean((z - sg(c))^2) + beta * mean((sg(z) - c)^2): the features get the first
    term's gradient, the chosen codes the second's, and the table / projection that code through the chain rule."""
    quantizer = _quantizer(use_projection=use_projection, commitment_weight=0.7, beta=0.3).train()
    features = torch.randn(2, 8, 3, 3, requires_grad=True)
    out = quantizer(features)
    out.loss.backward()
    rows, ids, table, codes = _rows_and_codes(quantizer, features, out.token_ids)
    chosen = codes[ids]
    count = rows.numel()
    torch.testing.assert_close(out.loss.double(), (0.7 + 0.3) * ((rows - chosen) ** 2).mean(), atol=0, rtol=1e-6)
    feature_grad = (0.7 * 2 * (rows - chosen) / count).reshape(2, 3, 3, 8).permute(0, 3, 1, 2)
    torch.testing.assert_close(features.grad.double(), feature_grad, atol=1e-9, rtol=1e-5)
    code_grad = torch.zeros_like(codes).index_add_(0, ids, 0.3 * 2 * (chosen - rows) / count)
    if use_projection:
        weight = quantizer.projection.weight.detach().double()
        torch.testing.assert_close(quantizer.embedding.weight.grad.double(), code_grad @ weight, atol=1e-9, rtol=1e-5)
        torch.testing.assert_close(quantizer.projection.weight.grad.double(), code_grad.T @ table, atol=1e-9,
                                   rtol=1e-5)
        torch.testing.assert_close(quantizer.projection.bias.grad.double(), code_grad.sum(0), atol=1e-9, rtol=1e-5)
    else:
        torch.testing.assert_close(quantizer.embedding.weight.grad.double(), code_grad, atol=1e-9, rtol=1e-5)


def test_computes_in_float32_under_autocast_and_returns_input_dtype():
    quantizer = _quantizer().train()
    features = torch.randn(2, 8, 4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(features)
    assert out.quantized.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    # the float32 computation on the bf16 values: loss to float32 precision, tokens of the float64 reference
    rows, ids, _, codes = _rows_and_codes(quantizer, features, out.token_ids)
    _, expected_ids = reference_quantize(features.double(), codes, 2, "sinkhorn")
    assert torch.equal(out.token_ids, expected_ids)
    torch.testing.assert_close(out.loss.double(), 1.25 * ((rows - codes[ids]) ** 2).mean(), atol=0, rtol=1e-6)
    assert torch.equal(out.quantized, codes[ids].reshape(2, 4, 4, 8).permute(0, 3, 1, 2).bfloat16())


def test_autocast_does_not_reach_the_codebook_projection():
    """Codes -0.501 and 1.5, feature 0.5: in float32 the second is nearer (1.0 < 1.001); a bf16 projection would
    round the first to -0.5 and tie them (token 0)."""
    quantizer = OptVQQuantizer(dim=4, codebook_size=2, inference_assignment="nearest").eval()
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.tensor([[-0.501] * 4, [1.5] * 4]))
        quantizer.projection.weight.copy_(torch.eye(4))
        quantizer.projection.bias.zero_()
    features = torch.full((1, 1, 4), 0.5, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(features)
    assert out.token_ids.flatten().tolist() == [1]
    assert out.loss.item() == pytest.approx(1.25 * 1.0)


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


def test_identical_features_get_the_reference_codes():
    quantizer = _quantizer().train()
    features = torch.zeros(2, 8, 4, 4)
    out = quantizer(features)
    rows, ids, _, codes = _rows_and_codes(quantizer, features, out.token_ids)
    # Identical rows: after the first code normalization every code's entries differ from 1/(NK) only through the
    # 1e-8 guard, far below float32 resolution, so any code whose column total is not guard-limited is a tie; the
    # chosen one must be one of those (the float64 plan's best within 1e-6 nats).
    assert_near_optimal(ids, reference_sinkhorn_log_plan(rows, codes), 1e-6)
    assert ids.unique().numel() == 1  # identical rows, one code
    torch.testing.assert_close(out.loss.double(), 1.25 * ((rows - codes[ids]) ** 2).mean(), atol=0, rtol=1e-6)


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


def test_the_codebook_learns_the_clusters_of_its_features():
    """The quantizer's own loss moves a codebook started near the origin onto 8 clusters: the nearest-code error
    falls to under 15% (6.91 -> 0.46 when written) and every code is used."""
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(8, 2, generator=generator) * 3
    data = (centers.repeat_interleave(32, 0) + 0.1 * torch.randn(256, 2, generator=generator))[None]
    torch.manual_seed(0)
    quantizer = OptVQQuantizer(dim=2, codebook_size=8, use_projection=False)
    with torch.no_grad():
        quantizer.embedding.weight.mul_(0.1)
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=0.05)

    def evaluate():
        out = quantizer.eval()(data)
        quantizer.train()
        return float((out.quantized - data).pow(2).mean()), float(out.codebook_usage)

    error_before, _ = evaluate()
    for _ in range(150):
        loss = quantizer(data).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    error_after, usage_after = evaluate()
    assert error_after < 0.15 * error_before, (error_before, error_after)
    assert usage_after == 1.0


def test_initialization_follows_the_original_code():
    """Table ~ N(0, 1), projection weight ~ N(0, 1 / code_dim), projection bias ~ U(-1/sqrt(code_dim), ...): the
    sample moments of 16384 draws each, within a few standard errors."""
    torch.manual_seed(0)
    quantizer = OptVQQuantizer(dim=256, codebook_size=64, num_heads=2)  # code_dim 128
    table, weight, bias = (p.detach() for p in (quantizer.embedding.weight, quantizer.projection.weight,
                                                quantizer.projection.bias))
    assert table.shape == (64, 128) and weight.shape == (128, 128)
    assert abs(float(table.mean())) < 0.03 and float(table.std()) == pytest.approx(1.0, abs=0.03)
    assert abs(float(weight.mean())) < 0.003 and float(weight.std()) == pytest.approx(128 ** -0.5, rel=0.03)
    bound = 128 ** -0.5
    assert float(bias.abs().max()) <= bound and float(bias.std()) == pytest.approx(bound / 3 ** 0.5, rel=0.2)


@pytest.mark.parametrize("use_projection", [True, False])
def test_a_bfloat16_quantizer_uses_its_codebook_in_float32(use_projection):
    """Parameters cast to bf16 (`module.to(torch.bfloat16)`): the codebook in use is computed in float32 from them,
    and the tokens are the nearest codes of that float32 codebook."""
    torch.manual_seed(0)
    quantizer = OptVQQuantizer(dim=4, codebook_size=8, use_projection=use_projection).eval().to(torch.bfloat16)
    table = quantizer.embedding.weight.double()
    expected = table if not use_projection else torch.nn.functional.linear(
        table, quantizer.projection.weight.double(), quantizer.projection.bias.double())
    codebook = quantizer.codebook
    assert codebook.dtype == torch.float32
    torch.testing.assert_close(codebook.double(), expected, rtol=1e-6, atol=1e-6)
    features = torch.randn(3, 4, 2, 2)
    rows = features.permute(0, 2, 3, 1).reshape(-1, 4).double()
    assert torch.equal(quantizer(features).token_ids.flatten(), torch.cdist(rows, expected).argmin(1))


def test_set_codebook_inverts_the_projection_and_falls_back_to_the_identity():
    """With an invertible projection the table becomes W^-1 (codes - b) and the projection keeps its weights; with a
    singular one the projection is reset to the identity and the table holds the codes."""
    torch.manual_seed(0)
    quantizer = OptVQQuantizer(dim=4, codebook_size=6)
    codes = torch.randn(6, 4) * 3
    weight, bias = quantizer.projection.weight.detach().clone(), quantizer.projection.bias.detach().clone()
    quantizer.set_codebook(codes)
    assert torch.equal(quantizer.projection.weight, weight) and torch.equal(quantizer.projection.bias, bias)
    expected = torch.linalg.solve(weight.double(), (codes.double() - bias.double()).T).T
    torch.testing.assert_close(quantizer.embedding.weight.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(quantizer.codebook, codes, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        quantizer.projection.weight[1] = quantizer.projection.weight[0]  # singular
    quantizer.set_codebook(codes)
    assert torch.equal(quantizer.projection.weight, torch.eye(4)) and torch.equal(quantizer.projection.bias,
                                                                                 torch.zeros(4))
    assert torch.equal(quantizer.embedding.weight, codes) and torch.equal(quantizer.codebook, codes)


def test_a_one_code_quantizer_gives_code_zero_everywhere():
    quantizer = OptVQQuantizer(dim=4, codebook_size=1).train()
    output = quantizer(torch.randn(2, 4, 3, 3))
    assert output.token_ids.shape == (2, 1, 3, 3) and not output.token_ids.any()
    with pytest.raises(ValueError, match="codebook_size"):
        OptVQQuantizer(dim=4, codebook_size=0)
