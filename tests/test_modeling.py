"""OptVQModel: the API contract, presets, input checks, transformers conventions, saving, loading and the Hub."""

import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModel

from optvq_hf import OptVQConfig, OptVQModel

TINY = dict(base_channels=32, channel_multipliers=[1, 2], num_res_blocks=1, attn_resolutions=[8], resolution=16,
            latent_channels=16, embed_dim=8, codebook_size=32, num_heads=2)


def tiny_model(**overrides):
    torch.manual_seed(0)
    return OptVQModel(OptVQConfig(**{**TINY, **overrides}))


def pixels(batch=2, channels=3, size=16, seed=0):
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _quantizer_reference(model, latents, token_ids, assignment):
    """float64, from the latents and the codebook: the rows, their codes, the reference tokens, loss, usage and
    perplexity over `codebook_size` codes."""
    from reference_optvq import reference_quantize

    codebook = model.get_codebook().double()
    heads = model.config.num_heads
    rows = latents.detach().double().permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
    quantized, expected_ids = reference_quantize(latents.detach(), codebook, heads, assignment)
    chosen = codebook[token_ids.permute(0, 2, 3, 1).reshape(-1)]
    counts = torch.bincount(token_ids.flatten(), minlength=codebook.shape[0]).double()
    probabilities = counts / counts.sum()
    entropy = -(probabilities[counts > 0] * probabilities[counts > 0].log()).sum()
    loss = (model.config.commitment_weight + model.config.beta) * ((rows - chosen) ** 2).mean()
    return dict(ids=expected_ids, quantized=quantized, loss=loss, usage=(counts > 0).double().mean(),
                perplexity=entropy.exp())


def test_forward_contract():
    model = tiny_model().train()
    out = model(pixels())
    assert out.reconstruction.shape == (2, 3, 16, 16)
    assert out.token_ids.shape == (2, 2, 8, 8) and out.token_ids.dtype == torch.long
    # every statistic recomputed here from the latents and the codebook, in float64
    reference = _quantizer_reference(model, out.latents, out.token_ids, "sinkhorn")
    assert torch.equal(out.token_ids, reference["ids"])
    torch.testing.assert_close(out.quantized.double(), reference["quantized"], atol=1e-6, rtol=0)
    assert out.quantization_loss.ndim == 0
    torch.testing.assert_close(out.quantization_loss.double(), reference["loss"], atol=0, rtol=1e-6)
    torch.testing.assert_close(out.codebook_usage.double(), reference["usage"])
    torch.testing.assert_close(out.perplexity.double(), reference["perplexity"], atol=0, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(out.reconstruction, model.decode_latents(out.quantized))
    (out.reconstruction.pow(2).mean() + out.quantization_loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantizer.embedding.weight.grad.abs().sum() > 0
    assert isinstance(model(pixels(), return_dict=False), tuple)


def test_encode_decode_contract():
    model = tiny_model().eval()
    with torch.no_grad():
        encoded = model.encode(pixels())
        assert encoded.latents.shape == encoded.quantized.shape == (2, 8, 8, 8)
        assert encoded.token_ids.shape == (2, 2, 8, 8)
        from_quantized = model.decode(encoded.quantized)
        from_tokens = model.decode_tokens(encoded.token_ids)
        full = model(pixels()).reconstruction
    assert from_quantized.shape == (2, 3, 16, 16)
    torch.testing.assert_close(from_tokens, from_quantized)
    torch.testing.assert_close(full, from_quantized)
    assert model.get_codebook().shape == (32, 4) and not model.get_codebook().requires_grad


def test_single_head_accepts_three_dimensional_token_ids():
    model = tiny_model(num_heads=1).eval()
    tokens = torch.randint(0, 32, (2, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(model.decode_tokens(tokens), model.decode_tokens(tokens[:, None]))


def test_nearest_inference_is_batch_independent_sinkhorn_is_not():
    model = tiny_model().eval()
    batch = pixels(batch=8, seed=3)
    with torch.no_grad():
        assert torch.equal(model.encode(batch[:1]).token_ids, model.encode(batch).token_ids[:1])
    model = tiny_model(inference_assignment="sinkhorn").eval()
    with torch.no_grad():
        single = model.encode(batch[:1]).token_ids
        joint = model.encode(batch).token_ids[:1]
    assert not torch.equal(single, joint)


@pytest.mark.parametrize("name", OptVQConfig.available_presets())
def test_presets_build(name):
    config = OptVQConfig.from_preset(name)
    assert config.embed_dim % config.num_heads == 0
    if config.architecture == "simple_cnn":
        model = OptVQModel(config).eval()
        with torch.no_grad():
            out = model(pixels(channels=config.in_channels, size=32))
        assert out.reconstruction.shape == (2, config.in_channels, 32, 32)
        assert out.token_ids.shape == (2, config.num_heads, 8, 8)


def test_imagenet_presets_match_the_release():
    config = OptVQConfig.from_preset("optvq-imagenet-16x16x4")
    assert (config.base_channels, config.channel_multipliers, config.attn_resolutions) == (128, [1, 1, 2, 2, 4], [16])
    assert (config.codebook_size, config.embed_dim, config.num_heads, config.downsample_factor) == (16384, 256, 4, 16)
    assert OptVQConfig.from_preset("optvq-imagenet-16x16x8").num_heads == 8
    f32 = OptVQConfig.from_preset("optvq-imagenet-f32")
    assert f32.downsample_factor == 32 and f32.attn_resolutions == [8]
    mnist = OptVQConfig.from_preset("optvq-mnist")
    assert (mnist.codebook_size, mnist.embed_dim, mnist.num_heads, mnist.downsample_factor) == (1024, 8, 4, 4)
    assert OptVQConfig.from_preset("vq-mnist").num_heads == 1
    with pytest.raises(ValueError, match="Unknown preset"):
        OptVQConfig.from_preset("optvq-imagenet")


@pytest.mark.parametrize(
    "make_input,match",
    [
        (lambda: pixels(channels=1), "3 channels"),
        (lambda: pixels(size=17), "divisible by the downsampling factor 2"),
        (lambda: pixels()[0], r"shape \(B, 3, H, W\)"),
        (lambda: torch.full((1, 3, 16, 16), float("nan")), "NaN or Inf"),
        (lambda: torch.full((1, 3, 16, 16), float("inf")), "NaN or Inf"),
        (lambda: torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "floating point"),
    ],
)
def test_bad_pixels_raise_value_error(make_input, match):
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        model(make_input())


def test_bad_tokens_and_latents_raise_value_error():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\[0, 31\]"):
        model.decode_tokens(torch.full((1, 2, 4, 4), 32))
    with pytest.raises(ValueError, match=r"\[0, 31\]"):
        model.decode_tokens(torch.full((1, 2, 4, 4), -1))
    with pytest.raises(ValueError, match="num_heads=2"):
        model.decode_tokens(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model.decode_tokens(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 8, h, w\)"):
        model.decode(torch.zeros(1, 6, 4, 4))


def test_token_id_layouts_and_their_shape_checks():
    """`check_token_ids` (behind decode_tokens, embed_token_ids and diffusers' get_codebook_entry): flat ids in
    raster order with the heads innermost plus `shape=(B, h, w, C)`, 4-D ids, and each check on its own."""
    model = tiny_model()  # 2 heads, 32 codes, embed_dim 8, latent_channels 16
    tokens = torch.randint(0, 32, (2, 2, 4, 5))
    flat = tokens.permute(0, 2, 3, 1).reshape(-1)
    for shape in ((2, 4, 5, 8), (2, 4, 5, 16), (torch.tensor(2), 4, 5, torch.tensor([8]))):
        assert torch.equal(model.check_token_ids(flat, shape=shape), tokens)
    assert torch.equal(model.check_token_ids(tokens, shape=(2, 4, 5, 8)), tokens)
    assert torch.equal(model.check_token_ids(tokens), tokens)
    for shape in ((2, 4, 5), (2.0, 4, 5, 8), (torch.tensor([2, 2]), 4, 5, 8)):
        with pytest.raises(ValueError, match=r"`shape` must be \(B, h, w, C\)"):
            model.check_token_ids(flat, shape=shape)
    with pytest.raises(ValueError, match=r"shape\[-1\]"):
        model.check_token_ids(flat, shape=(2, 4, 5, 7))
    with pytest.raises(ValueError, match="needs B\\*h\\*w"):
        model.check_token_ids(flat[:-1], shape=(2, 4, 5, 8))
    with pytest.raises(ValueError, match=r"must have shape \(1, 2, 4, 5\)"):
        model.check_token_ids(tokens, shape=(1, 4, 5, 8))
    with pytest.raises(ValueError, match=r"num_heads=2"):
        model.check_token_ids(torch.zeros(2, 3, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="flat ids need `shape"):
        model.check_token_ids(flat)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"embed_dim": 10, "num_heads": 4}, "divisible by `num_heads`"),
        ({"architecture": "unet"}, "architecture"),
        ({"quantizer_type": "fsq"}, "quantizer_type"),
        ({"inference_assignment": "random"}, "inference_assignment"),
        ({"base_channels": 20}, "norm_num_groups"),
        ({"use_quant_conv": False}, "must equal `latent_channels`"),
        ({"codebook_size": 0}, "codebook_size"),
    ],
)
def test_bad_configs_raise_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        OptVQConfig(**{**TINY, **overrides})


def test_save_load_roundtrip_and_auto_classes(tmp_path):
    model = tiny_model().eval()
    model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "README.md"} <= set(os.listdir(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "optvq"
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, OptVQConfig)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(reloaded, OptVQModel) and not reloaded.training
    batch = pixels()
    with torch.no_grad():
        a, b = model(batch), reloaded(batch)
    assert torch.equal(a.token_ids, b.token_ids)
    torch.testing.assert_close(a.reconstruction, b.reconstruction, atol=1e-5, rtol=1e-5)


def test_loading_weights_into_a_wrong_config_raises(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="do not fit"):
        OptVQModel.from_pretrained(tmp_path, codebook_size=64)


def test_bfloat16_loading_keeps_quantizer_in_float32(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model = OptVQModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.decoder.conv_out.weight.dtype == torch.bfloat16
    assert model.quantizer.embedding.weight.dtype == torch.float32
    with torch.no_grad():
        out = model(pixels().bfloat16())
    assert out.reconstruction.dtype == torch.bfloat16 and out.latents.dtype == torch.bfloat16
    # the quantizer works in float32 on the bf16 latents: the float64 nearest codes and loss of those values
    reference = _quantizer_reference(model, out.latents, out.token_ids, "nearest")
    assert torch.equal(out.token_ids, reference["ids"])
    assert out.quantization_loss.dtype == torch.float32
    torch.testing.assert_close(out.quantization_loss.double(), reference["loss"], atol=0, rtol=1e-6)
    # and the bf16 model reconstructs what the float32 model does, to bf16 precision: it picks (nearly) the same
    # codes (a latent within bf16 rounding of two codes may flip), and decodes any given codes as the float32 model
    full_model = tiny_model().eval()
    with torch.no_grad():
        full = full_model(pixels())
        full_from_bf16_codes = full_model.decode_tokens(out.token_ids)
    assert (out.token_ids == full.token_ids).float().mean() >= 0.95
    torch.testing.assert_close(out.reconstruction.float(), full_from_bf16_codes, atol=0.05, rtol=0.05)


def test_training_under_bf16_autocast_computes_the_quantizer_in_float32():
    model = tiny_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixels())
    assert out.latents.dtype == torch.bfloat16 and out.quantization_loss.dtype == torch.float32
    reference = _quantizer_reference(model, out.latents, out.token_ids, "sinkhorn")
    assert torch.equal(out.token_ids, reference["ids"])
    torch.testing.assert_close(out.quantization_loss.double(), reference["loss"], atol=0, rtol=1e-6)
    (out.reconstruction.float().pow(2).mean() + out.quantization_loss).backward()
    assert model.quantizer.embedding.weight.grad.dtype == torch.float32


def test_device_map_loading(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model = OptVQModel.from_pretrained(tmp_path, device_map="cpu")
    assert model.device.type == "cpu"


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = pixels()
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.encoder.down[0].block[0].gradient_checkpointing
            assert model.decoder.mid.attn_1.gradient_checkpointing
        out = model(batch)
        (out.reconstruction.pow(2).mean() + out.quantization_loss).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_sdpa_and_eager_attention_agree():
    outputs = []
    for implementation in ("sdpa", "eager"):
        model = tiny_model().eval()
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            outputs.append(model(pixels()).reconstruction)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


def test_no_split_modules_name_real_classes():
    model = tiny_model()
    names = {type(module).__name__ for module in model.modules()}
    assert set(model._no_split_modules) <= names


@pytest.mark.parametrize("training", [False, True])
def test_compiles_without_graph_breaks(training):
    model = tiny_model().train(training)
    explanation = torch._dynamo.explain(model.quantizer)(torch.randn(2, 8, 4, 4))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    explanation = torch._dynamo.explain(model)(pixels())
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_push_to_hub_uploads_weights_and_a_full_model_card(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import RepoUrl

    uploaded = {}

    def fake_create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = {name: open(os.path.join(folder_path, name), "rb").read() for name in os.listdir(folder_path)}
        uploaded["kwargs"] = kwargs
        return "https://huggingface.co/commit/0"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    model = tiny_model()
    model.push_to_hub("someone/optvq-tiny", commit_message="add model")
    assert uploaded["repo_id"] == "someone/optvq-tiny"
    assert {"config.json", "model.safetensors", "README.md"} <= set(uploaded["files"])
    assert uploaded["kwargs"]["commit_message"] == "add model"
    card = uploaded["files"]["README.md"].decode()
    for expected in ("license: mit", "optvq", "arxiv:2412.15195", "## Architecture", "## Codebook", "## Usage",
                     'OptVQModel.from_pretrained("someone/optvq-tiny")', "32 codes of dimension 4"):
        assert expected in card
    # the uploaded weights load back
    (tmp_path / "pushed").mkdir()
    for name, content in uploaded["files"].items():
        (tmp_path / "pushed" / name).write_bytes(content)
    OptVQModel.from_pretrained(tmp_path / "pushed")


def test_model_card_records_results():
    from optvq_hf.model_card import build_model_card

    card = build_model_card(OptVQConfig(**TINY), repo_id="me/m", eval_results={"psnr": 26.59, "ssim": 0.717},
                            dataset_name="imagenet-1k")
    assert card.data.eval_results[0].metric_value == 26.59
    assert "| psnr | 26.59 |" in card.content


@pytest.mark.parametrize("quantizer_type,phrase", [("optvq", "Sinkhorn"), ("vq", "nearest-neighbour vector"),
                                                    ("otvae", "OT-VAE quantization")])
def test_model_card_describes_the_quantizer(quantizer_type, phrase):
    from optvq_hf.model_card import build_model_card

    card = build_model_card(OptVQConfig(**{**TINY, "quantizer_type": quantizer_type}))
    assert phrase in card.content


def test_a_tiny_model_learns_to_reconstruct_and_uses_its_codebook():
    """60 Adam steps on 16 smooth images (reconstruction + quantizer loss): the error of the nearest-code
    reconstruction falls to under 30% (0.354 -> 0.038 when written) and every code ends up in use (0.5 -> 1.0)."""
    import numpy as np
    from training_helpers import smooth_image

    rng = np.random.default_rng(0)
    images = torch.tensor(np.stack([np.asarray(smooth_image(rng, 16, 16)) for _ in range(16)]))[:, None] / 127.5 - 1
    torch.manual_seed(0)
    model = OptVQModel(OptVQConfig.from_preset("optvq-mnist", codebook_size=32, base_channels=8, latent_channels=8,
                                               embed_dim=8, num_heads=4, resolution=16))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    @torch.no_grad()
    def evaluate():
        out = model.eval()(images)
        model.train()
        return float((out.reconstruction - images).pow(2).mean()), float(out.codebook_usage)

    error_before, usage_before = evaluate()
    for _ in range(60):
        out = model(images)
        loss = (out.reconstruction - images).pow(2).mean() + out.quantization_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    error_after, usage_after = evaluate()
    assert error_after < 0.3 * error_before, (error_before, error_after)
    assert usage_after == 1.0 > usage_before, (usage_before, usage_after)


def test_copying_weights_between_front_ends_names_the_keys_that_differ():
    """The copy behind `OptVQVQModel.from_optvq` (and back): identical weights, or a `ValueError` naming the keys."""
    model, without = tiny_model(), tiny_model(use_codebook_projection=False)
    with pytest.raises(ValueError, match=r"missing \['quantizer.projection.bias', 'quantizer.projection.weight'\], "
                                         r"unexpected \[\]"):
        model._copy_weights_from(without)
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['quantizer.projection.bias', "
                                         r"'quantizer.projection.weight'\]"):
        without._copy_weights_from(model)
    copy = OptVQModel(OptVQConfig(**TINY))  # other random weights
    copy._copy_weights_from(model)
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), model.state_dict().values()))
