"""The properties transformers' and diffusers' common test suites check (`ModelTesterMixin`, `ConfigTester`,
`ImageProcessingTestMixin`; diffusers' `ModelTesterMixin` for `VQModel`), written here for `OptVQModel`,
`OptVQConfig`, `OptVQImageProcessor` and `OptVQVQModel` on tiny real models."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from optvq_hf import OptVQConfig, OptVQImageProcessor, OptVQModel, OptVQVQModel
from optvq_hf.configuration_optvq import OPTVQ_CONFIG_FIELDS, PRESETS
from optvq_hf.quantization import available_quantizer_types

# A VQGAN (GroupNorm, attention, resnet shortcuts) and the small CNN, with code vectors of 16 channels so that the
# quantizer's projection (16 x 16) has enough entries to tell its initial distribution apart.
CONFIGS = {
    "vqgan": dict(base_channels=16, channel_multipliers=[1, 2], num_res_blocks=1, attn_resolutions=[8], resolution=16,
                  latent_channels=16, embed_dim=32, codebook_size=64, num_heads=2, norm_num_groups=8),
    "simple_cnn": dict(PRESETS["optvq-mnist"], embed_dim=32, num_heads=2, codebook_size=64),
}


def build(architecture="vqgan", seed=0, **overrides):
    torch.manual_seed(seed)
    return OptVQModel(OptVQConfig(**{**CONFIGS[architecture], **overrides})).eval()


def images(model, batch=3, seed=1):
    size = 16 if model.config.architecture == "vqgan" else 32
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, model.config.in_channels, size, size, generator=generator) * 2 - 1


def assert_outputs_equal(first, second):
    for key in first.keys():
        torch.testing.assert_close(first[key], second[key], msg=key)


# ----------------------------------------------------------------------------------------------------------------
# OptVQModel (ModelTesterMixin)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", sorted(CONFIGS))
def test_save_load_gives_the_same_outputs(architecture, tmp_path):
    model = build(architecture)
    model.save_pretrained(tmp_path)
    reloaded = OptVQModel.from_pretrained(tmp_path).eval()
    auto = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = model(images(model))
        assert_outputs_equal(expected, reloaded(images(model)))
        assert_outputs_equal(expected, auto(images(model)))
        as_tuple = model(images(model), return_dict=False)
    assert len(as_tuple) == len(expected) and all(torch.equal(a, b) for a, b in zip(as_tuple, expected.to_tuple()))


def fresh_parameters(architecture="vqgan", copies=4, **overrides):
    """Each parameter of `copies` freshly built models, stacked: samples of its initial distribution."""
    models = [build(architecture, seed=seed, **overrides) for seed in range(1, copies + 1)]
    return {name: torch.stack([dict(m.named_parameters())[name].detach() for m in models]) for name, _ in
            models[0].named_parameters()}


def _assert_initialized_like(name, loaded, samples):
    """`loaded` (initialized by `_init_weights` on loading) follows the initial distribution `samples` of fresh models
    show; never uninitialized memory."""
    assert torch.isfinite(loaded).all(), name
    std = float(samples.std())
    if std == 0:  # a constant initialization (norm weights 1, biases 0)
        torch.testing.assert_close(loaded, samples[0], msg=name)
        return
    if loaded.numel() >= 64:  # the std of n samples varies by about 1 / sqrt(2n): 9 % at n = 64
        assert abs(float(loaded.std()) / std - 1) < 0.35, (name, float(loaded.std()), std)
        assert abs(float(loaded.mean()) - float(samples.mean())) < 4 * std / loaded.numel() ** 0.5, name
    else:  # a few values: within the range of the fresh ones, and not all the same
        assert float(loaded.abs().max()) <= 1.5 * float(samples.abs().max()), (name, loaded)
        assert loaded.numel() == 1 or float(loaded.std()) > 0, name


@pytest.mark.parametrize("architecture", sorted(CONFIGS))
def test_init_weights_initializes_every_parameter(architecture, tmp_path):
    """A checkpoint without any weight (all missing at once), loaded with `initialize_missing_weights=True`: every
    parameter follows the initial distribution of a freshly built model, none is left as uninitialized memory."""
    model = build(architecture)
    model.save_pretrained(tmp_path)
    save_file({}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = OptVQModel.from_pretrained(tmp_path, initialize_missing_weights=True)
    fresh = fresh_parameters(architecture)
    for name, parameter in loaded.named_parameters():
        _assert_initialized_like(name, parameter.detach(), fresh[name])


@pytest.mark.parametrize("quantizer_type", available_quantizer_types())
def test_each_missing_parameter_is_initialized_and_the_others_loaded(quantizer_type, tmp_path):
    """Every parameter dropped from a checkpoint in turn (the quantizer's for every member, all of them for one
    member): the dropped one gets its initial distribution, the loaded ones keep the checkpoint's values."""
    model = build("vqgan", quantizer_type=quantizer_type)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    fresh = fresh_parameters("vqgan", quantizer_type=quantizer_type)
    names = sorted(saved) if quantizer_type == "optvq" else sorted(n for n in saved if n.startswith("quantizer."))
    for dropped in names:
        save_file({k: v for k, v in saved.items() if k != dropped}, str(tmp_path / "model.safetensors"),
                  metadata={"format": "pt"})
        loaded = OptVQModel.from_pretrained(tmp_path, initialize_missing_weights=True)
        for name, parameter in loaded.named_parameters():
            if name == dropped:
                _assert_initialized_like(name, parameter.detach(), fresh[name])
            else:
                assert torch.equal(parameter.detach(), saved[name]), (dropped, name)


@pytest.mark.parametrize("front_end", ["from_config", "from_pretrained", "diffusers"])
def test_the_quantizer_is_float32_on_every_loading_path(front_end, tmp_path):
    model = build("simple_cnn")
    if front_end == "from_config":
        loaded = AutoModel.from_config(model.config, dtype=torch.bfloat16)
    elif front_end == "from_pretrained":
        model.save_pretrained(tmp_path)
        loaded = OptVQModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    else:
        OptVQVQModel.from_optvq(model).save_pretrained(tmp_path)
        loaded = OptVQVQModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    dtypes = {name: parameter.dtype for name, parameter in loaded.named_parameters()}
    assert {dtype for name, dtype in dtypes.items() if name.startswith("quantizer.")} == {torch.float32}
    assert {dtype for name, dtype in dtypes.items() if not name.startswith("quantizer.")} == {torch.bfloat16}
    with torch.no_grad():
        reconstruction = loaded(images(model).bfloat16())
    reconstruction = reconstruction.reconstruction if front_end != "diffusers" else reconstruction.sample
    assert reconstruction.dtype == torch.bfloat16 and torch.isfinite(reconstruction).all()


@pytest.mark.parametrize("architecture", sorted(CONFIGS))
def test_batched_outputs_are_the_per_sample_outputs(architecture):
    """transformers' batching-equivalence property: every output field with a batch axis, sliced per sample, equals
    the output of that sample alone (0-d batch statistics are not per sample and are not compared)."""
    model = build(architecture)
    batch = images(model, batch=3)
    with torch.no_grad():
        batched = model(batch)
        for index in range(3):
            single = model(batch[index : index + 1])
            for key in batched.keys():
                if batched[key].ndim == 0:
                    continue
                assert batched[key].shape[0] == 3, key
                torch.testing.assert_close(batched[key][index : index + 1], single[key], msg=key, atol=1e-5,
                                           rtol=1e-4)
    assert batched.code_counts.shape == (3, model.config.codebook_size)
    assert (batched.code_counts.sum(1) == model.config.num_heads * batched.token_ids[0, 0].numel()).all()


def test_gradients_reach_every_parameter():
    model = build("vqgan").train()
    output = model(images(model))
    (output.reconstruction.square().mean() + output.quantization_loss).backward()
    without = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert without == []


# ----------------------------------------------------------------------------------------------------------------
# OptVQConfig (ConfigTester)
# ----------------------------------------------------------------------------------------------------------------
def _non_default_fields():
    return dict(CONFIGS["vqgan"], dropout=0.1, norm_eps=1e-5, use_codebook_projection=False, epsilon=3.0, num_iters=2,
                normalization="dim", commitment_weight=0.5, beta=0.5, inference_assignment="sinkhorn",
                gumbel_temperature=0.5, gumbel_hard=True, initializer_range=0.01, use_quant_conv=True)


def test_config_round_trips_through_json_files_and_dicts(tmp_path):
    config = OptVQConfig(**_non_default_fields())
    from_string = OptVQConfig.from_dict(json.loads(config.to_json_string()))
    config.to_json_file(tmp_path / "config.json")
    from_file = OptVQConfig.from_json_file(tmp_path / "config.json")
    config.save_pretrained(tmp_path / "saved")
    from_folder = OptVQConfig.from_pretrained(tmp_path / "saved")
    auto = AutoConfig.from_pretrained(tmp_path / "saved")
    for other in (from_string, from_file, from_folder, auto):
        assert isinstance(other, OptVQConfig)
        assert {f: getattr(other, f) for f in OPTVQ_CONFIG_FIELDS} == {f: getattr(config, f) for f in OPTVQ_CONFIG_FIELDS}


def test_config_takes_the_common_arguments_and_overrides():
    config = OptVQConfig(return_dict=False, output_hidden_states=True, **CONFIGS["vqgan"])
    assert config.return_dict is False and config.output_hidden_states is True
    overridden = OptVQConfig.from_dict(OptVQConfig(**CONFIGS["vqgan"]).to_dict(), codebook_size=128)
    assert overridden.codebook_size == 128


# ----------------------------------------------------------------------------------------------------------------
# OptVQImageProcessor (ImageProcessingTestMixin)
# ----------------------------------------------------------------------------------------------------------------
def _processor(**overrides):
    return OptVQImageProcessor(**{"size": {"shortest_edge": 18}, "crop_size": {"height": 16, "width": 16}, **overrides})


def _inputs(kind, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (20 + 2 * i, 24, channels), dtype=np.uint8) for i in range(3)]
    if kind == "pil":
        return [Image.fromarray(a if channels > 1 else a[..., 0]) for a in arrays]
    if kind == "torch":
        return [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrays]
    return arrays


@pytest.mark.parametrize("kind", ["pil", "numpy", "torch"])
def test_processor_calls_batched_and_unbatched(kind):
    processor = _processor()
    inputs = _inputs(kind)
    assert processor(inputs[0], return_tensors="pt").pixel_values.shape == (1, 3, 16, 16)
    batched = processor(inputs, return_tensors="pt").pixel_values
    assert batched.shape == (3, 3, 16, 16) and -1 <= batched.min() and batched.max() <= 1


def test_processor_keeps_four_channels_without_rgb_conversion():
    processor = _processor()
    arrays = _inputs("numpy", channels=4)
    common = dict(do_convert_rgb=False, return_tensors="pt", input_data_format="channels_last",
                  image_mean=[0.0] * 4, image_std=[1.0] * 4)
    single = processor(arrays[0], **common).pixel_values
    batched = processor(arrays, **common).pixel_values
    assert single.shape == (1, 4, 16, 16) and batched.shape == (3, 4, 16, 16)
    torch.testing.assert_close(batched[:1], single)
    assert 0 <= batched.min() and batched.max() <= 1


def test_grayscale_processor_converts_unless_told_not_to():
    processor = _processor(num_channels=1)
    assert processor(_inputs("pil")[0], return_tensors="pt").pixel_values.shape == (1, 1, 16, 16)
    gray = _inputs("pil", channels=1)[0]
    assert processor(gray, do_convert_rgb=False, return_tensors="pt").pixel_values.shape == (1, 1, 16, 16)


def test_processor_round_trips_and_takes_overrides(tmp_path):
    processor = _processor(num_channels=1, do_center_crop=False)
    processor.save_pretrained(tmp_path)
    for reloaded in (OptVQImageProcessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert isinstance(reloaded, OptVQImageProcessor)
        assert reloaded.to_dict() == processor.to_dict()
    assert json.loads(processor.to_json_string())["num_channels"] == 1
    overridden = OptVQImageProcessor.from_dict(processor.to_dict(), size={"shortest_edge": 42})
    assert overridden.size == {"shortest_edge": 42}


# ----------------------------------------------------------------------------------------------------------------
# OptVQVQModel (diffusers' ModelTesterMixin for VQModel)
# ----------------------------------------------------------------------------------------------------------------
def test_diffusers_model_save_load_and_tuple_outputs(tmp_path):
    vqvae = OptVQVQModel.from_optvq(build("vqgan")).eval()
    vqvae.save_pretrained(tmp_path)
    reloaded, info = OptVQVQModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    sample = images(build("vqgan"))
    with torch.no_grad():
        expected = vqvae(sample)
        torch.testing.assert_close(reloaded.eval()(sample).sample, expected.sample)
        as_tuple = vqvae(sample, return_dict=False)
    torch.testing.assert_close(as_tuple[0], expected.sample)
    assert set(vqvae.config) >= set(OPTVQ_CONFIG_FIELDS)
