"""OptVQVQModel: the diffusers `VQModel` contract, lossless conversion with OptVQModel, and real diffusers pipelines
(LDM, LDM super-resolution, aMUSEd token decoding, the Kandinsky 2.2 decoder) built from tiny random components."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    AmusedPipeline,
    AmusedScheduler,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    KandinskyV22Pipeline,
    LDMPipeline,
    LDMSuperResolutionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
    UVit2DModel,
    VQModel,
)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

from optvq_hf import OptVQConfig, OptVQModel, OptVQVQModel, compute_scaling_factor  # noqa: E402
from reference_optvq import (  # noqa: E402
    reference_codebook,
    reference_decode,
    reference_encode_features,
    reference_quantize,
)
from test_convert_original import write_original_folder  # noqa: E402


def tiny_config(**overrides):
    """A 2-level VQGAN (f = 2) with attention at the 4x4 level: 8x8 images -> 4x4 latents."""
    values = dict(architecture="vqgan", in_channels=3, out_channels=3, base_channels=8, channel_multipliers=[1, 2],
                  num_res_blocks=1, attn_resolutions=[4], resolution=8, latent_channels=8, embed_dim=4,
                  codebook_size=32, num_heads=2, norm_num_groups=4)
    values.update(overrides)
    return OptVQConfig(**values)


def tiny_vqvae(seed=0, **overrides):
    settings = {key: overrides.pop(key) for key in ("scaling_factor", "lookup_from_codebook") if key in overrides}
    torch.manual_seed(seed)
    return OptVQVQModel.from_optvq(OptVQModel(tiny_config(**overrides)).eval(), **settings).eval()


def pixels(batch=2, channels=3, size=8, seed=1):
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def original_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("original")
    return path, write_original_folder(path, num_head=2)


# ----------------------------------------------------------------------------------------------------------------
# The VQModel contract, against the float64 reference of the original network
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_contract_matches_float64_reference_of_original_checkpoint(original_folder):
    path, state = original_folder
    vqvae = OptVQVQModel.from_pretrained(path)
    assert isinstance(vqvae, VQModel) and not vqvae.training
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1

    ref_latents = reference_encode_features(state, images, num_levels=2)
    ref_quantized, ref_tokens = reference_quantize(ref_latents, reference_codebook(state), num_heads=2,
                                                   assignment="nearest")
    ref_pixels = reference_decode(state, ref_quantized, num_levels=2)

    encoded = vqvae.encode(images)
    assert isinstance(encoded, diffusers.models.autoencoders.vq_model.VQEncoderOutput)
    torch.testing.assert_close(encoded.latents.double(), ref_latents, atol=1e-4, rtol=1e-4)
    assert vqvae.encode(images, return_dict=False)[0].shape == (3, 16, 8, 8)

    # decode() quantizes by default...
    decoded = vqvae.decode(encoded.latents)
    torch.testing.assert_close(decoded.sample.double(), ref_pixels, atol=1e-4, rtol=1e-4)
    assert decoded.commit_loss.ndim == 0 and decoded.commit_loss > 0
    # ... force_not_quantize decodes latents as given (so un-quantized latents give other pixels)
    as_given = vqvae.decode(ref_quantized.float(), force_not_quantize=True)
    torch.testing.assert_close(as_given.sample.double(), ref_pixels, atol=1e-4, rtol=1e-4)
    assert torch.equal(as_given.commit_loss, torch.zeros(3))
    assert not torch.allclose(vqvae.decode(encoded.latents, force_not_quantize=True).sample, decoded.sample,
                              atol=1e-3)

    # quantize(): diffusers' (z_q, loss, (perplexity, min_encodings, indices)); indices raster order, heads innermost
    quantized, loss, (perplexity, min_encodings, indices) = vqvae.quantize(encoded.latents)
    torch.testing.assert_close(quantized.double(), ref_quantized, atol=1e-5, rtol=1e-5)
    assert min_encodings is None and loss.ndim == 0 and perplexity >= 1
    assert torch.equal(indices, ref_tokens.permute(0, 2, 3, 1).reshape(-1))

    # token ids decode like aMUSEd calls it (flat ids + shape), with C = vq_embed_dim or latent_channels
    for channels in (vqvae.config.vq_embed_dim, vqvae.config.latent_channels):
        from_ids = vqvae.decode(indices.reshape(3, -1), force_not_quantize=True, shape=(3, 8, 8, channels))
        torch.testing.assert_close(from_ids.sample.double(), ref_pixels, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(vqvae.decode(ref_tokens).sample.double(), ref_pixels, atol=1e-4, rtol=1e-4)

    # forward = decode(encode(x)), returning DecoderOutput / (sample, commit_loss)
    sample, commit_loss = vqvae(images, return_dict=False)
    torch.testing.assert_close(sample.double(), ref_pixels, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(commit_loss, decoded.commit_loss)


def test_config_fields_pipelines_read():
    vqvae = tiny_vqvae(scaling_factor=0.5)
    config = vqvae.config
    latents = vqvae.encode(pixels()).latents
    # pipelines compute the downsampling factor from block_out_channels
    assert 8 // 2 ** (len(config.block_out_channels) - 1) == latents.shape[-1] == 4
    assert list(config.block_out_channels) == [8, 16]
    assert config.num_vq_embeddings == 32 and config.vq_embed_dim == latents.shape[1] == 4
    assert config.latent_channels == 8 and config.sample_size == 8 and config.norm_num_groups == 4
    assert config.scaling_factor == 0.5 and config.force_upcast is False and config.lookup_from_codebook is False
    assert config.in_channels == config.out_channels == 3
    assert vqvae.quantize.n_e == 32 and vqvae.quantize.vq_embed_dim == 4

    with pytest.raises(ValueError, match="block_out_channels"):
        OptVQVQModel(**_fields_only(vqvae), block_out_channels=[8, 32])
    with pytest.raises(ValueError, match="scaling_factor"):
        OptVQVQModel(**_fields_only(vqvae), scaling_factor=0.0)
    with pytest.raises(ValueError, match="num_heads"):
        OptVQVQModel(**{**_fields_only(vqvae), "num_heads": 3})


def _fields_only(vqvae):
    from optvq_hf.diffusers_vq import OPTVQ_CONFIG_FIELDS

    return {name: vqvae.config[name] for name in OPTVQ_CONFIG_FIELDS}


@torch.no_grad()
def test_get_codebook_entry_layouts_and_errors():
    vqvae = tiny_vqvae()
    heads, codebook = 2, vqvae.quantizer.codebook
    native = torch.randint(0, 32, (2, heads, 4, 4), generator=torch.Generator().manual_seed(0))
    # golden: head k of position (y, x) fills channels [2k, 2k+2)
    expected = codebook[native.permute(0, 2, 3, 1)].reshape(2, 4, 4, 4).permute(0, 3, 1, 2)
    flat = native.permute(0, 2, 3, 1).reshape(-1)
    get = vqvae.quantize.get_codebook_entry
    torch.testing.assert_close(get(native, None), expected)
    for layout in (flat, flat.reshape(2, -1), flat.reshape(2, 16, heads)):
        torch.testing.assert_close(get(layout, (2, 4, 4, 4)), expected)
    # diffusers semantics without shape: raw code vectors
    torch.testing.assert_close(get(flat[:5]), codebook[flat[:5]])

    with pytest.raises(ValueError, match="B\\*h\\*w\\*num_heads = 64"):
        get(flat[:-1], (2, 4, 4, 4))
    with pytest.raises(ValueError, match="vq_embed_dim \\(4\\) or latent_channels \\(8\\)"):
        get(flat, (2, 4, 4, 5))
    with pytest.raises(ValueError, match="integer tensor"):
        get(flat.float(), (2, 4, 4, 4))
    with pytest.raises(ValueError, match="\\[0, 31\\]"):
        get(flat + 32, (2, 4, 4, 4))
    with pytest.raises(ValueError, match="need `shape="):
        vqvae.decode(flat.reshape(2, 32), force_not_quantize=True)
    with pytest.raises(ValueError, match="\\(B, 4, h, w\\)"):
        vqvae.decode(torch.zeros(2, 5, 4, 4))
    with pytest.raises(ValueError, match="in_channels=3"):
        vqvae.encode(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="divisible by the downsampling factor 2"):
        vqvae.encode(torch.zeros(2, 3, 7, 8))


# ----------------------------------------------------------------------------------------------------------------
# Conversion with OptVQModel, both ways, and loading every folder layout
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["optvq-mnist", "tiny-vqgan"])
@torch.no_grad()
def test_lossless_conversion_both_ways(preset, tmp_path):
    torch.manual_seed(0)
    config = OptVQConfig.from_preset(preset) if preset != "tiny-vqgan" else tiny_config()
    optvq = OptVQModel(config).eval()
    images = pixels(channels=config.in_channels, size=16 if preset == "tiny-vqgan" else 32)
    reference = optvq(images)

    vqvae = OptVQVQModel.from_optvq(optvq, scaling_factor=0.25)
    assert not vqvae.training and vqvae.config.scaling_factor == 0.25
    own, theirs = vqvae.state_dict(), optvq.state_dict()
    assert own.keys() == theirs.keys() and all(torch.equal(own[k], theirs[k]) for k in own)
    assert all(own[k].data_ptr() != theirs[k].data_ptr() for k in own)  # a copy, not shared storage
    torch.testing.assert_close(vqvae(images).sample, reference.reconstruction, atol=1e-6, rtol=0)
    flat = vqvae.quantize(vqvae.encode(images).latents)[2][2]
    assert torch.equal(flat, reference.token_ids.permute(0, 2, 3, 1).reshape(-1))

    back = vqvae.to_optvq()
    assert type(back) is OptVQModel and back.config.to_diff_dict() == optvq.config.to_diff_dict()
    torch.testing.assert_close(back(images).reconstruction, reference.reconstruction, atol=1e-6, rtol=0)

    # from_pretrained of an OptVQModel folder, then of the diffusers folder
    optvq.save_pretrained(tmp_path / "optvq")
    loaded = OptVQVQModel.from_pretrained(tmp_path / "optvq", scaling_factor=0.25, lookup_from_codebook=True)
    assert loaded.config.lookup_from_codebook is True and not loaded.training
    torch.testing.assert_close(loaded(images).sample, reference.reconstruction, atol=1e-6, rtol=0)
    loaded.save_pretrained(tmp_path / "diffusers")
    saved = json.loads((tmp_path / "diffusers" / "config.json").read_text())
    assert saved["_class_name"] == "OptVQVQModel" and saved["scaling_factor"] == 0.25 and "model_type" not in saved
    reloaded = OptVQVQModel.from_pretrained(tmp_path / "diffusers")
    torch.testing.assert_close(reloaded(images).sample, reference.reconstruction, atol=1e-6, rtol=0)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(reloaded.config) == public(loaded.config)


def test_dtype_conversion_keeps_quantizer_float32(tmp_path):
    optvq = OptVQModel(tiny_config()).eval()
    optvq.save_pretrained(tmp_path)
    vqvae = OptVQVQModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert vqvae.encoder.conv_in.weight.dtype == torch.bfloat16
    assert vqvae.quantizer.embedding.weight.dtype == torch.float32
    back = vqvae.to_optvq()
    assert back.decoder.conv_in.weight.dtype == torch.bfloat16
    assert back.quantizer.projection.weight.dtype == torch.float32
    out = vqvae.decode(vqvae.encode(pixels().bfloat16()).latents).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@torch.no_grad()
def test_optvq_model_loads_diffusers_folders_and_pipeline_subfolders(tmp_path):
    """`OptVQModel.from_pretrained` (the loader of run_eval, tokenize_dataset, train_ar_prior) reads the diffusers
    layout too, also a pipeline's `vqvae` subfolder; the processor falls back to the model config there."""
    from optvq_hf import OptVQImageProcessor

    torch.manual_seed(0)
    optvq = OptVQModel(tiny_config(inference_assignment="nearest")).eval()
    images = pixels(size=8)
    reference = optvq.encode(images).token_ids
    OptVQVQModel.from_optvq(optvq, scaling_factor=0.5).save_pretrained(tmp_path / "diffusers")
    loaded = OptVQModel.from_pretrained(tmp_path / "diffusers")
    assert type(loaded) is OptVQModel and not loaded.training
    assert loaded.config.to_diff_dict() == optvq.config.to_diff_dict()
    assert torch.equal(loaded.encode(images).token_ids, reference)
    assert all(torch.equal(value, optvq.state_dict()[key]) for key, value in loaded.state_dict().items())

    pipe = LDMPipeline(vqvae=OptVQVQModel.from_optvq(optvq), unet=tiny_unet(4, 4, sample_size=4),
                       scheduler=DDIMScheduler(num_train_timesteps=10))
    pipe.save_pretrained(tmp_path / "pipeline")
    half = OptVQModel.from_pretrained(tmp_path / "pipeline", subfolder="vqvae", dtype=torch.bfloat16,
                                      inference_assignment="sinkhorn")
    assert half.encoder.conv_in.weight.dtype == torch.bfloat16 and half.quantizer.embedding.weight.dtype == torch.float32
    assert half.config.inference_assignment == "sinkhorn"
    processor = OptVQImageProcessor.from_pretrained_or_model_config(tmp_path / "pipeline", half.config,
                                                                    subfolder="vqvae")
    assert processor.crop_size == {"height": 8, "width": 8} and processor.num_channels == half.config.in_channels
    with pytest.raises(TypeError, match="no_such_argument"):
        OptVQModel.from_pretrained(tmp_path / "diffusers", no_such_argument=1)


def test_import_without_diffusers():
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import optvq_hf\n"
        "assert 'OptVQVQModel' not in optvq_hf.__all__\n"
        "from optvq_hf import *\n"
        "try:\n    optvq_hf.OptVQVQModel\nexcept ImportError:\n    print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


# ----------------------------------------------------------------------------------------------------------------
# Scaling factor
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_compute_scaling_factor(tmp_path):
    vqvae = tiny_vqvae()
    vqvae.train()
    data = pixels(batch=6, seed=3)
    latents = vqvae.eval().encode(data).latents.double()
    vqvae.train()
    expected = 1.0 / latents.std().item()  # unbiased std over all elements
    assert compute_scaling_factor(vqvae, data) == pytest.approx(expected, rel=1e-9)
    assert vqvae.training  # mode restored
    loader = torch.utils.data.DataLoader([{"pixel_values": image} for image in data], batch_size=4)
    assert compute_scaling_factor(vqvae, loader) == pytest.approx(expected, rel=1e-6)  # other conv batch sizes
    first = 1.0 / vqvae.eval().encode(data[:4]).latents.double().std().item()
    assert compute_scaling_factor(vqvae, loader, max_batches=1) == pytest.approx(first, rel=1e-6)
    # scaled latents are unit-variance
    assert (latents * expected).std().item() == pytest.approx(1.0, rel=1e-9)

    assert vqvae.fit_scaling_factor([(data[:3], torch.zeros(3)), (data[3:], torch.zeros(3))]) == pytest.approx(expected)
    vqvae.save_pretrained(tmp_path)
    assert OptVQVQModel.from_pretrained(tmp_path).config.scaling_factor == pytest.approx(expected)
    with pytest.raises(ValueError, match="image tensor"):
        compute_scaling_factor(vqvae, [{"label": torch.zeros(2)}])
    with pytest.raises(ValueError, match="iterable"):
        compute_scaling_factor(vqvae, 3)


# ----------------------------------------------------------------------------------------------------------------
# Real pipelines with tiny random components
# ----------------------------------------------------------------------------------------------------------------
def tiny_unet(in_channels, out_channels, sample_size):
    return UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
                       block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


@torch.no_grad()
def test_ldm_pipeline_end_to_end_and_save_reload(tmp_path):
    vqvae = tiny_vqvae(scaling_factor=0.7)
    torch.manual_seed(1)
    unet = tiny_unet(4, 4, sample_size=4)
    pipe = LDMPipeline(vqvae=vqvae, unet=unet, scheduler=DDIMScheduler(num_train_timesteps=10))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()

    # Golden: the same DDIM loop by hand, then latents / scaling_factor -> quantize -> decode.
    scheduler = DDIMScheduler(num_train_timesteps=10)
    scheduler.set_timesteps(3)
    latents = randn_tensor((2, 4, 4, 4), generator=torch.manual_seed(0))
    for t in scheduler.timesteps:
        latents = scheduler.step(unet(latents, t).sample, t, latents, eta=0.0).prev_sample
    optvq = vqvae.to_optvq()
    tokens = optvq.quantize(latents / 0.7).token_ids
    expected = (optvq.decode_tokens(tokens) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images, expected, atol=1e-5)

    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["vqvae"][1] == "OptVQVQModel"
    reloaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(reloaded, LDMPipeline) and type(reloaded.vqvae) is OptVQVQModel
    assert reloaded.vqvae.config.scaling_factor == 0.7
    reloaded.set_progress_bar_config(disable=True)
    again = reloaded(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    np.testing.assert_array_equal(again, images)

    # loading the pipeline in bfloat16 keeps the quantizer in float32 (`_keep_in_fp32_modules`)
    half = DiffusionPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).vqvae
    assert half.decoder.conv_in.weight.dtype == torch.bfloat16
    assert half.quantizer.embedding.weight.dtype == torch.float32
    assert half.decode(latents.bfloat16()).sample.dtype == torch.bfloat16


@torch.no_grad()
def test_ldm_super_resolution_pipeline():
    # the pipeline concatenates 3-channel latents with the 3-channel low-resolution image
    vqvae = tiny_vqvae(embed_dim=3, num_heads=3, attn_resolutions=[])
    torch.manual_seed(2)
    pipe = LDMSuperResolutionPipeline(vqvae=vqvae, unet=tiny_unet(6, 3, sample_size=8),
                                      scheduler=DDIMScheduler(num_train_timesteps=10))
    pipe.set_progress_bar_config(disable=True)
    low_res = pixels(batch=1, size=8, seed=4)
    upscaled = pipe(image=low_res, num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images
    assert upscaled.shape == (1, 3, 16, 16) and torch.isfinite(upscaled).all()

    # Golden: the same DDIM loop by hand (latents concatenated with the low-resolution image), then quantize+decode.
    scheduler = DDIMScheduler(num_train_timesteps=10)
    scheduler.set_timesteps(2)
    latents = randn_tensor((1, 3, 8, 8), generator=torch.manual_seed(0))
    for t in scheduler.timesteps:
        noise = pipe.unet(torch.cat([latents, low_res], dim=1), t).sample
        latents = scheduler.step(noise, t, latents, eta=0.0).prev_sample
    optvq = vqvae.to_optvq()
    expected = optvq.decode(optvq.quantize(latents).quantized).clamp(-1, 1) / 2 + 0.5
    torch.testing.assert_close(upscaled, expected, atol=1e-5, rtol=0)


def tiny_clip(tmp_path):
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "c": 3, "a": 4, "t</w>": 5, "ca": 6, "cat</w>": 7}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=8)
    torch.manual_seed(3)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=len(vocab), hidden_size=8, intermediate_size=16,
        num_attention_heads=2, num_hidden_layers=2, projection_dim=8, max_position_embeddings=8))
    return tokenizer, text_encoder


@torch.no_grad()
def test_amused_pipeline_decodes_tokens_with_single_head_model(tmp_path):
    vqvae = tiny_vqvae(num_heads=1, lookup_from_codebook=True)
    tokenizer, text_encoder = tiny_clip(tmp_path)
    assert tokenizer("a cat").input_ids == [0, 2, 7, 1]
    torch.manual_seed(4)
    transformer = UVit2DModel(
        hidden_size=8, use_bias=False, hidden_dropout=0.0, cond_embed_dim=8, micro_cond_encode_dim=2,
        micro_cond_embed_dim=10, encoder_hidden_size=8, vocab_size=33, codebook_size=32, in_channels=8,
        block_out_channels=8, num_res_blocks=1, downsample=True, upsample=True, block_num_heads=1,
        num_hidden_layers=1, num_attention_heads=1, attention_dropout=0.0, intermediate_size=8, layer_norm_eps=1e-6,
        ln_elementwise_affine=True, sample_size=4)
    pipe = AmusedPipeline(vqvae=vqvae, tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                          scheduler=AmusedScheduler(mask_token_id=32))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 2
    kwargs = dict(num_inference_steps=2, height=8, width=8, guidance_scale=2.0)
    images = pipe("a cat", generator=torch.manual_seed(0), output_type="np", **kwargs).images
    tokens = pipe("a cat", generator=torch.manual_seed(0), output_type="latent", **kwargs).images
    assert images.shape == (1, 8, 8, 3) and tokens.shape == (1, 4, 4) and tokens.dtype == torch.long
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 32  # no mask token left
    # golden: OptVQModel.decode_tokens of the generated tokens, clipped as aMUSEd does
    expected = vqvae.to_optvq().decode_tokens(tokens).clip(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images, expected, atol=1e-6)


@torch.no_grad()
def test_kandinsky22_decoder_uses_movq_without_quantizing():
    movq = tiny_vqvae()
    torch.manual_seed(5)
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=8, addition_embed_type="image", encoder_hid_dim=8,
        encoder_hid_dim_type="image_proj", cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(8, 16), layers_per_block=1,
        resnet_time_scale_shift="scale_shift", class_embed_type=None)
    scheduler = DDPMScheduler(num_train_timesteps=10, beta_schedule="linear", clip_sample=True,
                              clip_sample_range=1.0, variance_type="learned_range")
    pipe = KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.movq_scale_factor == 2
    embeds = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
    negative = torch.randn(1, 8, generator=torch.Generator().manual_seed(1))
    kwargs = dict(image_embeds=embeds, negative_image_embeds=negative, height=8, width=8, num_inference_steps=2)
    images = pipe(generator=torch.manual_seed(0), output_type="np", **kwargs).images
    latents = pipe(generator=torch.manual_seed(0), output_type="latent", **kwargs).images
    assert images.shape == (1, 8, 8, 3) and latents.shape == (1, 4, 4, 4)
    optvq = movq.to_optvq()
    expected = (optvq.decode(latents) * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images, expected, atol=1e-6)
    quantized = (optvq.decode(optvq.quantize(latents).quantized) * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert not np.allclose(images, quantized.numpy(), atol=1e-3)


def test_gradient_checkpointing_gives_the_same_gradients():
    vqvae = tiny_vqvae(quantizer_type="vq").train()
    images = pixels(size=8, seed=7)

    def gradients():
        vqvae.zero_grad()
        output = vqvae(images)
        (output.sample.square().mean() + output.commit_loss).backward()
        return {name: p.grad.clone() for name, p in vqvae.named_parameters() if p.grad is not None}

    plain = gradients()
    calls = []

    def checkpoint(function, *args):
        calls.append(function)
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)

    vqvae.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
    checkpointed = gradients()
    assert len(calls) >= 6  # every ResNet / attention block of encoder and decoder
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)
