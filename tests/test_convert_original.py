"""Loading the original release's checkpoints: a folder in the original layout, built here from the release notes,
converted on the fly and checked against a float64 reference forward written in tests/reference_optvq.py."""

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from optvq_hf import OptVQConfig, OptVQImageProcessor, OptVQModel
from optvq_hf.convert_original import main as convert_main
from reference_optvq import (
    reference_codebook,
    reference_decode,
    reference_encode_features,
    reference_quantization_loss,
    reference_quantize,
)

TAMING = {"double_z": False, "z_channels": 32, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
          "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}


def original_config(num_head=2, quantize_type="optvq"):
    quantize = {"n_e": 64, "e_dim": 16, "beta": 0.25, "use_proj": True, "fix_codes": False, "epsilon": 10,
                "n_iters": 5, "normalize_mode": "all", "use_prob": False, "start_quantize_steps": None,
                "num_head": num_head, "loss_q_type": "l2"}
    return {
        "encoder": dict(TAMING), "decoder": dict(TAMING), "quantize": quantize,
        "loss": {"loss_l1_weight": 1.0, "loss_l2_weight": 1.0, "loss_p_weight": 3.0, "loss_q_weight": 1.0,
                 "loss_g_weight": 1.0, "loss_d_weight": 1.0, "disc_in_channels": 3, "disc_num_layers": 3,
                 "disc_start": 150000},
        "quantize_type": quantize_type, "use_connector": True, "ckpt_path": None, "ignore_keys": [],
        "image_key": "image", "colorize_nlabels": None, "monitor": None,
    }


def _taming_shapes(cfg, quantize):
    """Key -> shape of a taming VQGAN with the release's naming (from the reference notes), `model.` prefixed."""
    shapes = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        shapes[f"{name}.bias"] = (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"] = (c,)
        shapes[f"{name}.bias"] = (c,)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin); conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout); conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    ch, mult, nres, z = cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"], cfg["z_channels"]
    conv("model.encoder.conv_in", cfg["in_channels"], ch, 3)
    res_now, cin = cfg["resolution"], ch
    for level, m in enumerate(mult):
        for i in range(nres):
            res(f"model.encoder.down.{level}.block.{i}", cin, ch * m); cin = ch * m
            if res_now in cfg["attn_resolutions"]:
                attn(f"model.encoder.down.{level}.attn.{i}", cin)
        if level != len(mult) - 1:
            conv(f"model.encoder.down.{level}.downsample.conv", cin, cin, 3); res_now //= 2
    res("model.encoder.mid.block_1", cin, cin); attn("model.encoder.mid.attn_1", cin); res("model.encoder.mid.block_2", cin, cin)
    norm("model.encoder.norm_out", cin); conv("model.encoder.conv_out", cin, z, 3)
    e_dim = quantize["e_dim"]
    conv("model.quant_conv", z, e_dim, 1); conv("model.post_quant_conv", e_dim, z, 1)
    code_dim = e_dim // quantize["num_head"]
    shapes["model.quantize.embedding.weight"] = (quantize["n_e"], code_dim)
    shapes["model.quantize.proj.weight"] = (code_dim, code_dim)
    shapes["model.quantize.proj.bias"] = (code_dim,)
    cin = ch * mult[-1]
    conv("model.decoder.conv_in", z, cin, 3)
    res("model.decoder.mid.block_1", cin, cin); attn("model.decoder.mid.attn_1", cin); res("model.decoder.mid.block_2", cin, cin)
    res_now = cfg["resolution"] // 2 ** (len(mult) - 1)
    for level in reversed(range(len(mult))):
        for i in range(nres + 1):
            res(f"model.decoder.up.{level}.block.{i}", cin, ch * mult[level]); cin = ch * mult[level]
            if res_now in cfg["attn_resolutions"]:
                attn(f"model.decoder.up.{level}.attn.{i}", cin)
        if level != 0:
            conv(f"model.decoder.up.{level}.upsample.conv", cin, cin, 3); res_now *= 2
    norm("model.decoder.norm_out", cin); conv("model.decoder.conv_out", cin, cfg["out_ch"], 3)
    # training-only weights that the release also stores
    conv("loss.discriminator.main.0", 3, 8, 4)
    shapes["loss.discriminator.main.2.running_mean"] = (8,)
    conv("loss.perceptual_loss.net.slice1.0", 3, 8, 3)
    return shapes


def write_original_folder(path, num_head=2, quantize_type="optvq", seed=0):
    config = original_config(num_head, quantize_type)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in _taming_shapes(config["encoder"], config["quantize"]).items():
        if key.endswith("norm1.weight") or key.endswith("norm2.weight") or ".norm" in key and key.endswith(".weight") and len(shape) == 1:
            tensor = 1 + 0.1 * torch.randn(shape, generator=generator)
        elif "embedding" in key:
            tensor = torch.randn(shape, generator=generator)
        elif key.endswith(".weight") and len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            tensor = torch.randn(shape, generator=generator) * (1.0 / fan_in) ** 0.5
        else:
            tensor = 0.1 * torch.randn(shape, generator=generator)
        state[key] = tensor.contiguous()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "README.md").write_text("---\ntags:\n- model_hub_mixin\n---\nstub\n")
    save_file(state, str(path / "model.safetensors"))
    return state


@pytest.fixture(scope="module")
def original_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("original")
    state = write_original_folder(path)
    return path, state


def _pixels(batch=3, seed=1):
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_config_is_translated(original_folder):
    path, _ = original_folder
    model = OptVQModel.from_pretrained(path)
    config = model.config
    assert (config.base_channels, config.channel_multipliers, config.num_res_blocks) == (32, [1, 2], 1)
    assert (config.embed_dim, config.codebook_size, config.num_heads, config.latent_channels) == (16, 64, 2, 32)
    assert config.quantizer_type == "optvq" and config.use_codebook_projection and config.beta == 0.25
    assert not model.training


def test_logs_the_conversion(original_folder, caplog):
    path, _ = original_folder
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_info()
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.INFO):
            OptVQModel.from_pretrained(path)
    finally:
        hf_logging.disable_propagation()
        hf_logging.set_verbosity_warning()
    assert "Converted the original-layout OptVQ checkpoint" in caplog.text


@pytest.mark.parametrize("assignment", ["nearest", "sinkhorn"])
def test_matches_reference_forward(original_folder, assignment):
    path, state = original_folder
    model = OptVQModel.from_pretrained(path, inference_assignment=assignment)
    pixels = _pixels()
    with torch.no_grad():
        encoded = model.encode(pixels)
        decoded = model.decode_tokens(encoded.token_ids)
    ref_features = reference_encode_features(state, pixels, num_levels=2)
    ref_codebook = reference_codebook(state)
    ref_quantized, ref_tokens = reference_quantize(ref_features, ref_codebook, num_heads=2, assignment=assignment)
    ref_pixels = reference_decode(state, ref_quantized, num_levels=2)

    torch.testing.assert_close(encoded.latents.double(), ref_features, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.get_codebook().double(), ref_codebook, atol=1e-5, rtol=1e-5)
    assert torch.equal(encoded.token_ids, ref_tokens)
    torch.testing.assert_close(decoded.double(), ref_pixels, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(encoded.quantized.double(), ref_quantized, atol=1e-5, rtol=1e-5)


def test_sinkhorn_tokens_depend_on_batch_nearest_do_not(original_folder):
    path, state = original_folder
    pixels = _pixels(batch=6)
    nearest = OptVQModel.from_pretrained(path, inference_assignment="nearest")
    with torch.no_grad():
        alone = nearest.encode(pixels[:1]).token_ids
        together = nearest.encode(pixels).token_ids[:1]
    assert torch.equal(alone, together)
    # Sinkhorn assigns the whole batch jointly: the first image's tokens are the float64 reference's for the batch
    # they were encoded in, and they differ between the two batches
    sinkhorn = OptVQModel.from_pretrained(path, inference_assignment="sinkhorn")
    codebook = reference_codebook(state)
    features = reference_encode_features(state, pixels, num_levels=2)
    with torch.no_grad():
        alone = sinkhorn.encode(pixels[:1]).token_ids
        together = sinkhorn.encode(pixels).token_ids[:1]
    assert torch.equal(alone, reference_quantize(features[:1], codebook, 2, "sinkhorn")[1])
    assert torch.equal(together, reference_quantize(features, codebook, 2, "sinkhorn")[1][:1])
    assert not torch.equal(alone, together)


def test_cli_writes_a_native_folder(original_folder, tmp_path, capsys):
    path, _ = original_folder
    out = tmp_path / "converted"
    convert_main(["--input", str(path), "--output", str(out), "--inference_assignment", "sinkhorn"])
    assert "Wrote the converted model" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "optvq" and config["inference_assignment"] == "sinkhorn"
    assert (out / "model.safetensors").exists() and (out / "preprocessor_config.json").exists()
    card = (out / "README.md").read_text()
    assert str(path) in card and "arxiv:2412.15195" in card
    converted = OptVQModel.from_pretrained(out)
    direct = OptVQModel.from_pretrained(path, inference_assignment="sinkhorn")
    pixels = _pixels()
    with torch.no_grad():
        a, b = converted(pixels), direct(pixels)
    assert torch.equal(a.token_ids, b.token_ids)
    torch.testing.assert_close(a.reconstruction, b.reconstruction)
    processor = OptVQImageProcessor.from_pretrained(out)
    assert processor.crop_size["height"] == 16


def test_basevq_original_is_plain_vq(tmp_path):
    state = write_original_folder(tmp_path / "vq", num_head=1, quantize_type="basevq")
    model = OptVQModel.from_pretrained(tmp_path / "vq")
    assert model.config.quantizer_type == "vq" and model.config.num_heads == 1
    pixels = _pixels(2)
    with torch.no_grad():
        tokens = model.encode(pixels).token_ids
    features = reference_encode_features(state, pixels, 2)
    _, ref_tokens = reference_quantize(features, reference_codebook(state), 1, "nearest")
    assert torch.equal(tokens, ref_tokens)


def _drop_quantize_keys(path, *keys):
    config = json.loads((path / "config.json").read_text())
    for key in keys:
        del config["quantize"][key]
    (path / "config.json").write_text(json.dumps(config))


def test_basevq_original_without_loss_q_type_trains_with_the_originals_ce_loss(tmp_path):
    # The original's plain-VQ configs leave loss_q_type (and may leave beta) to the class defaults: "ce", 1.0.
    state = write_original_folder(tmp_path / "vq", num_head=1, quantize_type="basevq")
    _drop_quantize_keys(tmp_path / "vq", "loss_q_type", "beta")
    model = OptVQModel.from_pretrained(tmp_path / "vq").train()
    assert (model.config.quantization_loss, model.config.beta) == ("ce", 1.0)
    pixels = _pixels(2)
    out = model(pixels)
    grad_table = torch.autograd.grad(out.quantization_loss, model.quantizer.embedding.weight)[0]

    table = state["model.quantize.embedding.weight"].double().requires_grad_()
    reference_state = {**state, "model.quantize.embedding.weight": table}
    features = reference_encode_features(state, pixels, 2)
    rows = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    codebook = reference_codebook(reference_state)
    ids = torch.cdist(rows, codebook.detach()).argmin(dim=1)
    reference = reference_quantization_loss(rows, codebook, ids, "ce", beta=1.0)
    reference_grad = torch.autograd.grad(reference, table)[0]
    torch.testing.assert_close(out.quantization_loss.double(), reference.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_table.double(), reference_grad, rtol=1e-3, atol=1e-4 * float(reference_grad.abs().max()))


@pytest.mark.parametrize("loss_q_type", ["l1", "l2", "ce"])
def test_loss_q_type_is_mapped(tmp_path, loss_q_type):
    write_original_folder(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantize"]["loss_q_type"] = loss_q_type
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    model = OptVQModel.from_pretrained(tmp_path / "m")
    assert model.config.quantization_loss == model.quantizer.quantization_loss == loss_q_type
    config["quantize"]["loss_q_type"] = "huber"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="loss_q_type"):
        OptVQModel.from_pretrained(tmp_path / "m")


def test_weights_that_do_not_fit_raise(tmp_path):
    state = write_original_folder(tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    config["quantize"]["n_e"] = 32  # the stored table has 64 codes
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit"):
        OptVQModel.from_pretrained(tmp_path / "bad")
    del state


def test_dtype_loading_keeps_quantizer_float32(original_folder):
    path, _ = original_folder
    model = OptVQModel.from_pretrained(path, dtype=torch.bfloat16)
    assert model.encoder.conv_in.weight.dtype == torch.bfloat16
    assert model.quantizer.embedding.weight.dtype == torch.float32
    with torch.no_grad():
        out = model(_pixels().bfloat16())
    assert out.reconstruction.dtype == torch.bfloat16 and torch.isfinite(out.reconstruction.float()).all()


def test_native_folder_is_not_treated_as_original(tmp_path):
    model = OptVQModel(OptVQConfig.from_preset("optvq-mnist"))
    model.save_pretrained(tmp_path)
    reloaded = OptVQModel.from_pretrained(tmp_path)
    assert reloaded.config.architecture == "simple_cnn"


def test_hub_id_resolves_through_the_hub_cache(tmp_path):
    # The Hub code path, without network: a Hub cache holding the repository as `hf_hub_download` lays it out.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--BorelTHU--optvq-16x16x4"
    state = write_original_folder(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = OptVQModel.from_pretrained("BorelTHU/optvq-16x16x4", cache_dir=tmp_path / "cache", local_files_only=True)
    pixels = _pixels(2)
    with torch.no_grad():
        tokens = model.encode(pixels).token_ids
    features = reference_encode_features(state, pixels, 2)
    _, expected = reference_quantize(features, reference_codebook(state), 2, "nearest")
    assert torch.equal(tokens, expected)
