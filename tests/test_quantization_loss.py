"""The quantization-loss forms of the original code (`quantization_loss`: "l2", "l1", "ce"), checked against a
float64 reference written from the release notes (tests/reference_optvq.py), for every member they apply to."""

import pytest
import torch

from optvq_hf import OptVQConfig, OptVQModel, OptVQQuantizer, VectorQuantizer
from optvq_hf import codebook_losses
from optvq_hf.codebook_losses import QUANTIZATION_LOSSES, distance_cross_entropy
from reference_optvq import reference_quantization_loss


def _rows_and_codes(num_rows=300, num_codes=50, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(num_rows, dim, generator=generator, dtype=torch.float64)
    codes = torch.randn(num_codes, dim, generator=generator, dtype=torch.float64)
    codes[3] = rows[5]  # a zero distance: cdist's gradient there is 0, ours must be too (not NaN)
    return rows, codes


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("soft", [False, True])
def test_distance_cross_entropy_matches_float64_reference(squared, soft, monkeypatch):
    monkeypatch.setattr(codebook_losses, "_BLOCK_ENTRIES", 500)  # 10 rows per block: many blocks
    rows, codes = _rows_and_codes()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, codes.shape[0], (rows.shape[0],), generator=generator)
    targets = torch.softmax(torch.randn(rows.shape[0], codes.shape[0], generator=generator, dtype=torch.float64), 1)
    scale = 0.7

    z, c = rows.float().requires_grad_(), codes.float().requires_grad_()
    loss = distance_cross_entropy(z, c, targets.float() if soft else ids, squared=squared, scale=scale)
    grads = torch.autograd.grad(loss, [z, c])

    z64, c64 = rows.clone().requires_grad_(), codes.clone().requires_grad_()
    distance = torch.cdist(z64, c64)
    logits = -scale * (distance.square() if squared else distance)
    if soft:
        reference = -(targets * torch.log_softmax(logits, dim=1)).sum(1).mean()
    else:
        reference = torch.nn.functional.cross_entropy(logits, ids)
    reference_grads = torch.autograd.grad(reference, [z64, c64])

    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), reference.detach(), rtol=1e-6, atol=1e-6)
    for ours, theirs in zip(grads, reference_grads):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-6 * float(theirs.abs().max()))


def test_distance_cross_entropy_under_compile_equals_eager():
    rows, codes = _rows_and_codes(num_rows=40, num_codes=16)
    rows, codes = rows.float(), codes.float()
    ids = torch.arange(40) % 16
    eager = distance_cross_entropy(rows, codes, ids)
    compiled = torch.compile(lambda z, c, t: distance_cross_entropy(z, c, t), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(rows, codes, ids), eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quantizer_class", [VectorQuantizer, OptVQQuantizer])
@pytest.mark.parametrize("loss_q_type", QUANTIZATION_LOSSES)
def test_every_member_computes_the_originals_loss_form(quantizer_class, loss_q_type):
    torch.manual_seed(0)
    quantizer = quantizer_class(dim=8, codebook_size=32, num_heads=2, beta=0.3, quantization_loss=loss_q_type).train()
    features = torch.randn(3, 8, 4, 4, requires_grad=True)
    out = quantizer(features)
    grads = torch.autograd.grad(out.loss, [features, quantizer.embedding.weight, quantizer.projection.weight])

    # The reference: rows (B*H*W*heads, d) in float64, the codebook as proj(table), the ids the quantizer chose.
    features64 = features.detach().double().requires_grad_()
    table = quantizer.embedding.weight.detach().double().requires_grad_()
    weight = quantizer.projection.weight.detach().double().requires_grad_()
    codebook = torch.nn.functional.linear(table, weight, quantizer.projection.bias.detach().double())
    rows = features64.permute(0, 2, 3, 1).reshape(-1, 4)
    ids = out.token_ids.permute(0, 2, 3, 1).reshape(-1)
    reference = reference_quantization_loss(rows, codebook, ids, loss_q_type, beta=0.3)
    reference_grads = torch.autograd.grad(reference, [features64, table, weight])

    torch.testing.assert_close(out.loss.double(), reference.detach(), rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(grads, reference_grads):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))


def test_ce_moves_every_code_and_ignores_the_weights():
    torch.manual_seed(0)
    features = torch.randn(2, 8, 4, 4)
    losses = []
    for commitment_weight, beta in ((1.0, 0.25), (0.5, 2.0)):
        torch.manual_seed(1)
        quantizer = VectorQuantizer(dim=8, codebook_size=16, commitment_weight=commitment_weight, beta=beta,
                                    quantization_loss="ce", use_projection=False)
        out = quantizer(features)
        out.loss.backward()
        losses.append(out.loss.detach())
        # unlike "l2", whose gradient reaches only the chosen codes, "ce" moves every code
        assert (quantizer.embedding.weight.grad.abs().sum(1) > 0).all()
    torch.testing.assert_close(losses[0], losses[1])


def test_config_field_is_validated_and_reaches_the_quantizer():
    with pytest.raises(ValueError, match="quantization_loss"):
        OptVQConfig.from_preset("vq-mnist", quantization_loss="cross_entropy")
    with pytest.raises(ValueError, match="quantization_loss"):
        VectorQuantizer(dim=8, codebook_size=16, quantization_loss="l3")
    for loss_q_type in QUANTIZATION_LOSSES:
        model = OptVQModel(OptVQConfig.from_preset("optvq-mnist", codebook_size=64, quantization_loss=loss_q_type))
        assert model.quantizer.quantization_loss == loss_q_type


def test_presets_use_the_original_configs_loss_forms():
    for name in OptVQConfig.available_presets():
        config = OptVQConfig.from_preset(name)
        expected = "ce" if config.quantizer_type == "vq" else "l2"  # plain-VQ configs leave loss_q_type at "ce"
        assert config.quantization_loss == expected, name


def test_otvae_warns_that_it_has_its_own_loss():
    with pytest.warns(UserWarning, match="quantization_loss='ce' does not apply"):
        config = OptVQConfig.from_preset("otvae-mnist", quantization_loss="ce")
    assert config.quantization_loss == "ce"


# The model sections of the original ImageNet configs (configs/imagenet/*.yaml of the release), as the loader reads
# them: each preset must be the converted config, field for field.
_TAMING_F16 = {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
               "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.0}
_SINKHORN = {"epsilon": 10, "n_iters": 5, "normalize_mode": "all", "use_prob": False, "loss_q_type": "l2"}


def _original(quantize_type, num_head, **taming):
    quantize = {"n_e": 16384, "e_dim": 256, "beta": 0.25, "use_proj": True, "fix_codes": False,
                "start_quantize_steps": None, "num_head": num_head, **(_SINKHORN if quantize_type == "optvq" else {})}
    encoder = {**_TAMING_F16, **taming}
    return {"encoder": encoder, "decoder": dict(encoder), "quantize": quantize, "quantize_type": quantize_type,
            "use_connector": True}


@pytest.mark.parametrize("preset, original", [
    ("optvq-imagenet-16x16x4", _original("optvq", 4)),
    ("optvq-imagenet-16x16x8", _original("optvq", 8)),
    ("optvq-imagenet-f32", _original("optvq", 8, ch_mult=[1, 1, 2, 2, 4, 4], attn_resolutions=[8])),
    ("vq-imagenet-16x16x4", _original("basevq", 4)),  # vqbase_256_f16_h4.yaml: no loss_q_type -> "ce"
])
def test_imagenet_presets_are_the_original_configs_field_for_field(preset, original):
    from optvq_hf.configuration_optvq import OPTVQ_CONFIG_FIELDS
    from optvq_hf.convert_original import config_from_original

    converted, ours = config_from_original(original), OptVQConfig.from_preset(preset)
    assert {f: getattr(ours, f) for f in OPTVQ_CONFIG_FIELDS} == {f: getattr(converted, f) for f in OPTVQ_CONFIG_FIELDS}


@pytest.mark.parametrize("preset, in_channels, quantizer_type, num_heads, loss_q_type", [
    ("optvq-mnist", 1, "optvq", 4, "l2"), ("vq-mnist", 1, "vq", 1, "ce"),
    ("optvq-cifar10", 3, "optvq", 4, "l2"), ("vq-cifar10", 3, "vq", 1, "ce"),
])
def test_small_cnn_presets_are_the_original_configs(preset, in_channels, quantizer_type, num_heads, loss_q_type):
    # configs/{mnsit,cifar10}/{optvq,vqbase}.yaml: PlainCNN (16, 16, 32 channels, 32 latent), connector, n_e 1024,
    # e_dim 8, beta 0.25, use_proj; Sinkhorn epsilon 10, 5 iterations, "all" for OptVQ.
    config = OptVQConfig.from_preset(preset)
    assert (config.architecture, config.base_channels, config.channel_multipliers, config.latent_channels) == (
        "simple_cnn", 16, [1, 1, 2], 32)
    assert (config.in_channels, config.out_channels, config.use_quant_conv) == (in_channels, in_channels, True)
    assert (config.codebook_size, config.embed_dim, config.beta, config.use_codebook_projection) == (1024, 8, 0.25, True)
    assert (config.quantizer_type, config.num_heads, config.quantization_loss) == (quantizer_type, num_heads, loss_q_type)
    assert (config.epsilon, config.num_iters, config.normalization, config.commitment_weight) == (10.0, 5, "all", 1.0)
