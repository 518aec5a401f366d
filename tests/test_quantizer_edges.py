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
    gradient (a gradient that is None on one rank would stall DDP's all-reduce of the others); its statistics are
    those of an empty histogram: no counts, no usage, perplexity exp(0) = 1 (not the NaN of 0 / 0)."""
    from optvq_hf import get_quantizer_class

    quantizer = get_quantizer_class(quantizer_type)(dim=8, codebook_size=16, num_heads=2,
                                                    quantization_loss=quantization_loss).train()
    output = quantizer(torch.zeros(0, 8, 4, 4, requires_grad=True))
    assert output.loss.item() == 0.0 and output.token_ids.shape == (0, 2, 4, 4)
    assert not output.code_counts.any() and output.codebook_usage.item() == 0.0 and output.perplexity.item() == 1.0
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


# ---- written against the survivors of the session-4 mutation run (docs/testing.md) -------------------------------
def test_reset_parameters_draws_the_original_initialization_again():
    """`reset_parameters` (also what `from_pretrained(..., initialize_missing_weights=True)` runs for a checkpoint
    without the quantizer) redraws every parameter from the original code's distributions, whatever they held: table
    ~ N(0, 1), projection weight ~ N(0, 1/d), bias ~ U(-1/sqrt(d), 1/sqrt(d)) (Kolmogorov-Smirnov against scipy)."""
    from scipy import stats

    torch.manual_seed(0)
    quantizer = OptVQQuantizer(dim=64, codebook_size=512)
    with torch.no_grad():
        for parameter in quantizer.parameters():
            parameter.fill_(7.0)
    quantizer.reset_parameters()
    bound = 64 ** -0.5
    table = quantizer.embedding.weight.detach().double().flatten().numpy()
    weight = quantizer.projection.weight.detach().double().flatten().numpy()
    bias = quantizer.projection.bias.detach().double().numpy()
    assert stats.kstest(table, stats.norm(0.0, 1.0).cdf).pvalue > 1e-3
    assert stats.kstest(weight, stats.norm(0.0, bound).cdf).pvalue > 1e-3
    assert stats.kstest(bias, stats.uniform(-bound, 2 * bound).cdf).pvalue > 1e-3


def _identity_projection(quantizer, bias):
    with torch.no_grad():
        quantizer.projection.weight.copy_(torch.eye(quantizer.code_dim))
        quantizer.projection.bias.fill_(bias)


def test_set_codebook_keeps_the_projection_exactly_while_its_inverse_reproduces_the_codes():
    """The table W^-1 (codes - b) is kept while it reproduces the codes within 1e-3 (1 + max |codes|) (bound
    included); beyond that the projection becomes the identity and the table the codes. Cases computed by hand."""
    # 1. W = I, b = 40000: float32 spaces numbers near 40000 by 2^-8, so codes - b rounds -0.0015 to -40000 and the
    # table gives back 0 instead of -0.0015 (residual 0.0015 > 1e-3 * (1 + 0.0015)); the zero codes come back exactly.
    quantizer = OptVQQuantizer(dim=4, codebook_size=6)
    _identity_projection(quantizer, 40000.0)
    codes = torch.zeros(6, 4)
    codes[::2] = -0.0015
    quantizer.set_codebook(codes)
    assert torch.equal(quantizer.projection.weight, torch.eye(4)) and not quantizer.projection.bias.any()
    assert torch.equal(quantizer.embedding.weight, codes) and torch.equal(quantizer.codebook, codes)
    # 2. The bound itself: a residual of exactly 1e-3 * (1 + 0.5) (the largest code 0.5 comes back exactly) keeps the
    # projection, although those codes come back as 0.
    threshold = 1e-3 * (1 + torch.tensor(0.5))  # float32, as the codes
    quantizer = OptVQQuantizer(dim=4, codebook_size=6)
    _identity_projection(quantizer, 40000.0)
    codes = torch.full((6, 4), 0.5)
    codes[1:] = -threshold
    quantizer.set_codebook(codes)
    assert torch.equal(quantizer.projection.weight, torch.eye(4))
    assert torch.equal(quantizer.projection.bias, torch.full((4,), 40000.0))
    assert torch.equal(quantizer.codebook[0], codes[0]) and not quantizer.codebook[1:].any()
    # 3. Codes near 1000 (one of them 0) through a projection of condition number 1000: a float32 inverse is off by
    # about 0.03, far inside 1e-3 * (1 + 1000) = 1.0: the projection stays.
    generator = torch.Generator().manual_seed(1)
    left, _ = torch.linalg.qr(torch.randn(4, 4, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(4, 4, generator=generator, dtype=torch.float64))
    weight = (left @ torch.diag(torch.logspace(0, -3, 4, dtype=torch.float64)) @ right.T).float()
    codes = 1000 + torch.randn(6, 4, generator=generator)
    codes[0, 0] = 0.0
    bias = torch.randn(4, generator=generator)
    quantizer = OptVQQuantizer(dim=4, codebook_size=6)
    with torch.no_grad():
        quantizer.projection.weight.copy_(weight)
        quantizer.projection.bias.copy_(bias)
    quantizer.set_codebook(codes)
    assert torch.equal(quantizer.projection.weight, weight) and torch.equal(quantizer.projection.bias, bias)
    expected = torch.linalg.solve(weight.double(), (codes.double() - bias.double()).T).T
    torch.testing.assert_close(quantizer.embedding.weight.double(), expected, rtol=1e-3, atol=0)
    torch.testing.assert_close(quantizer.codebook, codes, rtol=0, atol=1e-3 * (1 + 1000.0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_set_codebook_works_on_a_quantizer_in_another_dtype(dtype):
    """A quantizer cast to float64 or bf16 (`module.to(dtype)`): the inverse is solved in float32 and the codebook in
    use equals the codes to the parameters' precision, the projection kept."""
    torch.manual_seed(0)
    quantizer = OptVQQuantizer(dim=4, codebook_size=6).to(dtype)
    weight, bias = quantizer.projection.weight.detach().clone(), quantizer.projection.bias.detach().clone()
    codes = torch.randn(6, 4) * 3
    quantizer.set_codebook(codes)
    assert torch.equal(quantizer.projection.weight, weight) and torch.equal(quantizer.projection.bias, bias)
    assert quantizer.embedding.weight.dtype == dtype
    expected = torch.linalg.solve(weight.double(), (codes.double() - bias.double()).T).T
    tolerance = 1e-5 if dtype == torch.float64 else 1e-2
    torch.testing.assert_close(quantizer.embedding.weight.double(), expected, rtol=tolerance, atol=tolerance)
    # the codebook in use: float32 from the stored table (bf16: the table's rounding, amplified by |W| <= 2)
    torch.testing.assert_close(quantizer.codebook.double(), codes.double(), rtol=0, atol=20 * tolerance)


def test_codebook_loss_of_no_rows_is_zero_and_of_one_row_is_its_cross_entropy():
    """The `"ce"` loss called directly (as a member's `quantize_rows` does): no rows give 0 with a zero gradient for
    every code (not the NaN mean of nothing); one row gives -log softmax(-D)[id], computed here in float64."""
    torch.manual_seed(0)
    quantizer = OptVQQuantizer(dim=4, codebook_size=5, quantization_loss="ce")
    codebook = quantizer.codebook
    flat = torch.zeros(0, 4, requires_grad=True)
    token_ids = torch.zeros(0, dtype=torch.long)
    loss = quantizer.codebook_loss(flat, codebook, token_ids, codebook[token_ids])
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(quantizer.embedding.weight.grad, torch.zeros(5, 4))
    row = torch.randn(1, 4)
    for token in range(5):
        loss = quantizer.codebook_loss(row, codebook, torch.tensor([token]), codebook[[token]])
        distances = torch.linalg.vector_norm(row.double() - codebook.detach().double(), dim=1)
        expected = -torch.log_softmax(-distances, dim=0)[token]
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quantization_loss", ["l2", "ce"])
@pytest.mark.parametrize("quantizer_type", ["optvq", "vq", "otvae"])
def test_low_precision_features_give_the_float32_results_rounded_once(quantizer_type, quantization_loss):
    """bf16 features are quantized in float32: tokens, loss and the features' gradient equal those of the same
    features in float32, the quantized features and the gradient rounded to bf16 once (not each term on its own)."""
    import copy

    from optvq_hf import get_quantizer_class

    torch.manual_seed(0)
    quantizer = get_quantizer_class(quantizer_type)(dim=8, codebook_size=16, num_heads=2,
                                                    quantization_loss=quantization_loss).train()
    twin = copy.deepcopy(quantizer)
    features = torch.randn(2, 8, 3, 3).bfloat16().requires_grad_()
    upstream = torch.randn(2, 8, 3, 3).bfloat16().float()
    reference = features.detach().float().requires_grad_()
    results = []
    for module, inputs in ((quantizer, features), (twin, reference)):
        torch.manual_seed(1)  # OT-VAE samples
        output = module(inputs)
        (output.loss + (output.quantized.float() * upstream).sum()).backward()
        results.append(output)
    low, high = results
    assert torch.equal(low.token_ids, high.token_ids) and torch.equal(low.loss, high.loss)
    assert low.quantized.dtype == torch.bfloat16 and torch.equal(low.quantized, high.quantized.bfloat16())
    assert torch.equal(features.grad, reference.grad.bfloat16())
    assert torch.equal(quantizer.embedding.weight.grad, twin.embedding.weight.grad)


def test_the_quantizers_token_id_check_names_the_layout_it_expects():
    quantizer = OptVQQuantizer(dim=8, codebook_size=16, num_heads=2)
    image = torch.randint(0, 16, (2, 2, 3, 3))
    quantizer.check_token_ids(image)  # the image layout unless told
    quantizer.check_token_ids(image.flatten(2).transpose(1, 2), "sequence")
    with pytest.raises(ValueError, match=r"\(B, num_heads, H, W\) with num_heads=2, got \(2, 3, 3, 3\)"):
        quantizer.check_token_ids(torch.randint(0, 16, (2, 3, 3, 3)))
    with pytest.raises(ValueError, match=r"\(B, T, num_heads\) with num_heads=2, got \(2, 9, 3\)"):
        quantizer.check_token_ids(torch.randint(0, 16, (2, 9, 3)), "sequence")
    # the type and dtype before the shape: a list or float ids of a wrong shape are named as such
    with pytest.raises(ValueError, match="must be a torch.Tensor, got list"):
        quantizer.check_token_ids([[1, 2]])
    with pytest.raises(ValueError, match="integer tensor, got dtype torch.float32"):
        quantizer.check_token_ids(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"in \[0, 15\].*got values in \[0, 16\]"):
        quantizer.check_token_ids(torch.tensor([0, 16]).reshape(1, 2, 1, 1))


def test_a_subclass_of_optvq_quantizer_is_one_without_a_warning():
    """Only the former subclasses (VectorQuantizer, OTVAEQuantizer) get the FutureWarning of the isinstance shim."""
    import warnings

    class Tweaked(OptVQQuantizer):
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(Tweaked(dim=4, codebook_size=8), OptVQQuantizer) and issubclass(Tweaked, OptVQQuantizer)
        assert not issubclass(torch.nn.Linear, OptVQQuantizer)


def test_every_member_evaluates_with_nearest_codes_and_optvq_also_with_sinkhorn():
    """`inference_assignments` (what `run_eval.py --inference_assignment` accepts, what model cards state): "nearest"
    for every member, "sinkhorn" for OptVQ; a config asking for another falls back to "nearest"."""
    from optvq_hf import OptVQConfig, available_quantizer_types, get_quantizer_class

    for quantizer_type in available_quantizer_types():
        cls = get_quantizer_class(quantizer_type)
        assert "nearest" in cls.inference_assignments
        for assignment in ("nearest", "sinkhorn"):
            config = OptVQConfig(quantizer_type=quantizer_type, inference_assignment=assignment)
            supported = quantizer_type == "optvq" or assignment == "nearest"
            assert (assignment in cls.inference_assignments) == supported
            assert cls.resolved_inference_assignment(config) == (assignment if supported else "nearest")
    torch.manual_seed(0)
    rows = torch.randn(1, 40, 4)
    quantizer = OptVQQuantizer(dim=4, codebook_size=8, inference_assignment="sinkhorn").eval()
    codebook = quantizer.codebook.detach()
    assert torch.equal(quantizer(rows).token_ids.flatten(), reference_sinkhorn_assign(rows[0], codebook))
