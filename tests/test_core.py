"""The shared core under every front end: config fields declared once and converted losslessly (every field, every
quantizer type, both ways, through save/load), inputs checked once at the public boundary, and the quantizer
registry (a member added in a test works everywhere)."""

import inspect
import json

import pytest
import torch

from optvq_hf import (
    CodebookQuantizer,
    OptVQConfig,
    OptVQModel,
    available_quantizer_types,
    get_quantizer_class,
    register_quantizer,
)
from optvq_hf.configuration_optvq import OPTVQ_CONFIG_FIELDS

diffusers = pytest.importorskip("diffusers")
from optvq_hf import OptVQVQModel  # noqa: E402

DEFAULTS = {name: p.default for name, p in inspect.signature(OptVQConfig.__init__).parameters.items()
            if name in OPTVQ_CONFIG_FIELDS}

# A value other than the default for every field (quantizer_type is set per test).
NON_DEFAULT = dict(
    architecture="simple_cnn", in_channels=1, out_channels=2, base_channels=8, channel_multipliers=[1, 2, 2],
    num_res_blocks=1, attn_resolutions=[4], resolution=16, latent_channels=12, dropout=0.1, norm_num_groups=4,
    norm_eps=1e-5, use_quant_conv=False, embed_dim=12, codebook_size=48, num_heads=3, use_codebook_projection=False,
    epsilon=3.0, num_iters=4, normalization="dim", commitment_weight=0.5, beta=0.1, quantization_loss="l1",
    inference_assignment="sinkhorn",
    gumbel_temperature=0.5, gumbel_hard=True, initializer_range=0.05,
)


def fields_of(config) -> dict:
    """Every OptVQConfig field of an OptVQConfig or a diffusers config."""
    get = config.get if isinstance(config, dict) else lambda name: getattr(config, name)
    return {name: get(name) for name in OPTVQ_CONFIG_FIELDS}


def pixels(channels=1, size=16, seed=0):
    return torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_config_fields_are_the_constructor_parameters():
    assert set(OPTVQ_CONFIG_FIELDS) == set(inspect.signature(OptVQConfig.__init__).parameters) - {"self", "kwargs"}
    assert set(NON_DEFAULT) | {"quantizer_type"} == set(OPTVQ_CONFIG_FIELDS)  # the round trip covers every field


def test_diffusers_side_declares_every_config_field_with_its_default():
    parameters = inspect.signature(OptVQVQModel.__init__).parameters
    missing = [name for name in OPTVQ_CONFIG_FIELDS if name not in parameters]
    assert not missing, f"OptVQVQModel does not declare {missing}"
    assert {name: parameters[name].default for name in OPTVQ_CONFIG_FIELDS} == DEFAULTS
    config = OptVQVQModel(**{**NON_DEFAULT, "quantizer_type": "otvae"}).config  # and stores each one
    assert fields_of(config) == {**NON_DEFAULT, "quantizer_type": "otvae"}


@pytest.mark.parametrize("quantizer_type", ["optvq", "vq", "otvae"])
@torch.no_grad()
def test_every_config_field_survives_every_conversion(quantizer_type, tmp_path):
    values = {**NON_DEFAULT, "quantizer_type": quantizer_type}
    assert all(values[name] != DEFAULTS[name] for name in NON_DEFAULT)
    torch.manual_seed(0)
    optvq = OptVQModel(OptVQConfig(**values)).eval()
    images = pixels()
    reference = optvq(images)
    quantizer_state = {key: value for key, value in vars(optvq.quantizer).items()
                       if not key.startswith("_") and isinstance(value, (int, float, str, bool))}
    assert {"epsilon", "num_iters", "beta"} <= set(quantizer_state) or quantizer_type == "vq"

    def check(model, config):
        assert fields_of(config) == values
        built = {key: getattr(model.quantizer, key) for key in quantizer_state}
        assert built == quantizer_state  # e.g. OT-VAE's gumbel_temperature / gumbel_hard
        state, expected = model.state_dict(), optvq.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)

    vqvae = OptVQVQModel.from_optvq(optvq, scaling_factor=0.5)
    check(vqvae, vqvae.config)
    vqvae.save_pretrained(tmp_path / "diffusers")
    reloaded = OptVQVQModel.from_pretrained(tmp_path / "diffusers")
    check(reloaded, reloaded.config)
    torch.testing.assert_close(reloaded(images).sample, reference.reconstruction, atol=1e-6, rtol=0)
    back = reloaded.to_optvq()
    check(back, back.config)
    back.save_pretrained(tmp_path / "transformers")
    final = OptVQModel.from_pretrained(tmp_path / "transformers")
    check(final, final.config)
    assert torch.equal(final(images).token_ids, reference.token_ids)
    # the other way in: a transformers folder loaded as diffusers
    converted = OptVQVQModel.from_pretrained(tmp_path / "transformers")
    check(converted, converted.config)


@torch.no_grad()
def test_diffusers_folders_saved_before_the_gumbel_fields_still_load(tmp_path):
    vqvae = OptVQVQModel.from_optvq(OptVQModel(OptVQConfig.from_preset("otvae-mnist")).eval())
    vqvae.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for name in ("gumbel_temperature", "gumbel_hard", "initializer_range"):  # what older versions did not store
        del config[name]
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = OptVQVQModel.from_pretrained(tmp_path)
    assert reloaded.config.gumbel_temperature == 1.0 and reloaded.quantizer.gumbel_hard is False
    torch.testing.assert_close(reloaded(pixels(size=32)).sample, vqvae(pixels(size=32)).sample)


# ----------------------------------------------------------------------------------------------------------------
# Inputs are checked once, at the public boundary
# ----------------------------------------------------------------------------------------------------------------
def count_ops(run, name):
    with torch.profiler.profile() as prof:
        run()
    return sum(1 for event in prof.events() if event.name == name)


@pytest.mark.parametrize("training", [True, False])
def test_one_finiteness_check_per_call(training):
    torch.manual_seed(0)
    model = OptVQModel(OptVQConfig.from_preset("optvq-mnist", codebook_size=64)).train(training)
    vqvae = OptVQVQModel.from_optvq(model)
    images = pixels(size=32)
    # one value check (one `all` reduction: finiteness, or finiteness and magnitude) per call: the model checks the
    # latents its encoder computed; the quantizer called from inside does not check them again
    assert count_ops(lambda: model(images), "aten::all") == 1
    assert count_ops(lambda: model.encode(images), "aten::all") == 1
    assert count_ops(lambda: vqvae(images), "aten::all") == 1
    latents = model.encode_latents(images).detach()
    assert count_ops(lambda: model.quantize(latents), "aten::all") == 1
    assert count_ops(lambda: vqvae.decode(latents), "aten::all") == 1
    assert count_ops(lambda: model.quantizer(latents), "aten::all") == 1  # standalone: checks its input
    # token ids: one range check (min and max once), none inside the quantizer
    tokens = model.encode(images).token_ids
    assert count_ops(lambda: model.decode_tokens(tokens), "aten::min") == 1
    assert count_ops(lambda: vqvae.decode(tokens), "aten::min") == 1


def test_no_finiteness_check_in_training_on_an_accelerator():
    """On a device other than the CPU a full-tensor check is a host synchronization: training mode skips it. The meta
    device stands in for an accelerator here: reading a meta tensor back fails, so a check would raise."""
    model = OptVQModel(OptVQConfig.from_preset("optvq-mnist", codebook_size=64))
    on_device = torch.empty(2, 1, 32, 32, device="meta")
    model.train().check_pixel_values(on_device)  # no read-back
    model.quantizer.train().check_input(torch.empty(2, 8, 8, 8, device="meta"))
    with pytest.raises((NotImplementedError, RuntimeError)):
        model.eval().check_pixel_values(on_device)  # inference checks (and would synchronize)
    with pytest.raises(ValueError, match="NaN or Inf"):  # on CPU, training mode still checks
        model.train()(torch.full((1, 1, 32, 32), float("nan")))


# ----------------------------------------------------------------------------------------------------------------
# The registry: a new member is one class and one registration
# ----------------------------------------------------------------------------------------------------------------
class FarthestCodeQuantizer(CodebookQuantizer):
    """A toy member: the farthest code in training, the nearest at inference."""

    display_name = "farthest-code VQ"

    def assign(self, features, codebook):
        if self.training:
            return torch.cdist(features, codebook).argmax(dim=1)
        return self.nearest(features, codebook)


def test_a_registered_member_works_in_every_front_end(tmp_path):
    from optvq_hf.model_card import build_model_card

    register_quantizer("toy-farthest", FarthestCodeQuantizer)
    register_quantizer("toy-farthest", FarthestCodeQuantizer)  # registering the same class again is allowed
    assert "toy-farthest" in available_quantizer_types()
    assert get_quantizer_class("toy-farthest") is FarthestCodeQuantizer
    assert FarthestCodeQuantizer.quantizer_type == "toy-farthest"

    config = OptVQConfig.from_preset("vq-mnist", quantizer_type="toy-farthest", codebook_size=32)
    torch.manual_seed(0)
    model = OptVQModel(config).train()
    assert isinstance(model.quantizer, FarthestCodeQuantizer)
    assert "FarthestCodeQuantizer" in model._no_split_modules
    images = pixels(size=32)
    output = model(images)
    (output.reconstruction.square().mean() + output.quantization_loss).backward()
    assert model.quantizer.embedding.weight.grad.abs().sum() > 0
    codebook = model.quantizer.codebook.detach()
    rows = model.encode_latents(images).detach().permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
    assert torch.equal(output.token_ids.flatten(), torch.cdist(rows, codebook).argmax(1))

    assert "farthest-code VQ quantization" in build_model_card(config).content
    model.eval().save_pretrained(tmp_path / "m")
    reloaded = OptVQModel.from_pretrained(tmp_path / "m")
    vqvae = OptVQVQModel.from_optvq(reloaded)
    with torch.no_grad():
        assert torch.equal(vqvae.tokenize(images), model.encode(images).token_ids)
    with pytest.raises(ValueError, match="already registered"):
        register_quantizer("toy-farthest", type("Other", (CodebookQuantizer,), {}))
    with pytest.raises(ValueError, match="CodebookQuantizer subclasses"):
        register_quantizer("toy-module", torch.nn.Linear)
    for name in ("", 3, None):
        with pytest.raises(ValueError, match="non-empty string"):
            register_quantizer(name, FarthestCodeQuantizer)
    # A member that sets nothing inherits nearest-neighbour assignment in both modes, and only that at inference.
    assert FarthestCodeQuantizer.inference_assignments == ("nearest",)
    quantizer = FarthestCodeQuantizer(dim=4, codebook_size=8)
    assert quantizer.train().assignment == "nearest" == quantizer.eval().assignment
    assert FarthestCodeQuantizer.resolved_inference_assignment(
        OptVQConfig(quantizer_type="toy-farthest", inference_assignment="sinkhorn")) == "nearest"


def test_members_that_implement_nothing_say_so():
    class Empty(CodebookQuantizer):
        pass

    with pytest.raises(NotImplementedError, match="assign"):
        Empty(dim=4, codebook_size=8)(torch.randn(1, 4, 2, 2))


def test_vector_quantizer_is_no_optvq_quantizer_any_more():
    from optvq_hf import OptVQQuantizer, VectorQuantizer

    assert VectorQuantizer.__mro__[1] is CodebookQuantizer
    with pytest.warns(FutureWarning, match="CodebookQuantizer"):  # old isinstance checks keep working, warned
        assert isinstance(VectorQuantizer(dim=4, codebook_size=8), OptVQQuantizer)
    assert not isinstance(FarthestCodeQuantizer(dim=4, codebook_size=8), OptVQQuantizer)


@pytest.mark.slow
def test_a_registered_member_trains_and_evaluates_with_the_example_scripts(tmp_path):
    import importlib.util

    from training_helpers import EXAMPLES, tiny_args, write_tiny_dataset

    import run_train  # on the path through training_helpers

    register_quantizer("toy-farthest", FarthestCodeQuantizer)
    data = write_tiny_dataset(str(tmp_path / "data"), num_train=16, num_test=4)
    output = str(tmp_path / "run")
    args = tiny_args(data, output, "--max_train_steps", "2", "--codebook_init", "kmeans", "--codebook_init_batches",
                     "1", "--codebook_init_iters", "2")
    args[args.index("--config_overrides") + 1] += ",quantizer_type=toy-farthest"
    metrics = run_train.main(args)
    assert metrics["quantizer_type"] == "toy-farthest" and "psnr" in metrics
    assert OptVQConfig.from_pretrained(output).quantizer_type == "toy-farthest"

    spec = importlib.util.spec_from_file_location("run_eval", f"{EXAMPLES}/run_eval.py")
    run_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_eval)
    results = run_eval.main(["--model", output, "--dataset_name", data, "--split", "test", "--output_dir",
                             str(tmp_path / "eval"), "--batch_size", "4", "--metrics", "psnr,usage"])
    assert results["num_samples"] == 4
    with pytest.raises(ValueError, match="not one of the assignments"):
        run_eval.main(["--model", output, "--dataset_name", data, "--split", "test", "--output_dir",
                       str(tmp_path / "eval2"), "--inference_assignment", "sinkhorn"])


def test_every_documented_default_is_the_real_one():
    """Each "name (`type`, defaults to X)" in the docstrings of the config, the quantizer family and the Sinkhorn
    engine's entry points is the default of the signature."""
    import inspect
    import re

    from optvq_hf import sinkhorn

    pattern = re.compile(r"^\s+(\w+) \(`[^`]*`(?:, \*optional\*)?, defaults to `?([^`)]*)`?\)", re.M)
    documented = 0
    for obj in [OptVQConfig, CodebookQuantizer, *(get_quantizer_class(t) for t in available_quantizer_types()),
                sinkhorn.sinkhorn_assign, sinkhorn.sinkhorn_plan]:
        signature = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
        for name, text in pattern.findall(inspect.getdoc(obj)):  # VectorQuantizer documents none of its own
            value = eval(text, {"__builtins__": {}})  # noqa: S307 - literals of our own docstrings
            default = signature.parameters[name].default
            assert (list(default) if isinstance(default, tuple) else default) == value, (obj, name, text, default)
            documented += 1
    assert documented >= 45
