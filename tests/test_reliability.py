"""Every broken checkpoint, config and input gets a clear `ValueError` (docs/reliability.md): loading, numerics."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig
from transformers.utils import logging as transformers_logging

from optvq_hf import OptVQConfig, OptVQModel, OptVQVQModel
from optvq_hf.convert_original import config_from_original
from optvq_hf.quantization import build_quantizer
from optvq_hf.sinkhorn import euclidean_argmin, sinkhorn_assign, sinkhorn_plan

VQGAN = dict(base_channels=16, channel_multipliers=[1, 2], num_res_blocks=1, attn_resolutions=[8], resolution=16,
             latent_channels=16, embed_dim=8, codebook_size=32, num_heads=2, norm_num_groups=8)


def tiny(architecture="vqgan"):
    torch.manual_seed(0)
    config = OptVQConfig(**VQGAN) if architecture == "vqgan" else OptVQConfig.from_preset("optvq-mnist", codebook_size=32)
    return OptVQModel(config).eval()


def pixels(model, batch=2):
    size = 16 if model.config.architecture == "vqgan" else 32
    return torch.rand(batch, model.config.in_channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def weights_file(folder):
    return next(p for p in folder.iterdir() if p.suffix == ".safetensors")


def rewrite_weights(folder, change):
    path = weights_file(folder)
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def save(front_end, model, folder):
    (OptVQVQModel.from_optvq(model) if front_end == "diffusers" else model).save_pretrained(folder)
    return OptVQVQModel if front_end == "diffusers" else OptVQModel


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("front_end", ["transformers", "diffusers"])
@pytest.mark.parametrize("name", ["quantizer.embedding.weight", "quantizer.projection.weight", "decoder.conv_out.weight"])
def test_a_missing_tensor_is_refused_naming_it(front_end, name, tmp_path):
    model = tiny()
    loader = save(front_end, model, tmp_path)
    rewrite_weights(tmp_path, lambda tensors: tensors.pop(name))
    for reader in {loader, OptVQModel}:  # OptVQModel reads diffusers folders too
        with pytest.raises(ValueError, match=rf"missing: \['{name}'\].*initialize_missing_weights=True"):
            reader.from_pretrained(tmp_path)
    loaded = loader.from_pretrained(tmp_path, initialize_missing_weights=True)  # asked for: initialized, usable
    parameter = loaded.get_parameter(name)
    assert parameter.device.type == "cpu" and torch.isfinite(parameter).all()
    with torch.no_grad():
        output = loaded(pixels(model))
    assert torch.isfinite(output.reconstruction if front_end == "transformers" else output.sample).all()


@pytest.mark.parametrize("front_end", ["transformers", "diffusers"])
def test_size_mismatches_are_listed_with_both_shapes_at_any_verbosity(front_end, tmp_path):
    loader = save(front_end, tiny(), tmp_path)
    rewrite_weights(tmp_path, lambda tensors: tensors.update({"quantizer.embedding.weight": torch.zeros(16, 4)}))
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        with pytest.raises(ValueError, match=r"quantizer\.embedding\.weight.*\(16, 4\).*\(32, 4\)|"
                                             r"quantizer\.embedding\.weight.*\[16, 4\].*\[32, 4\]"):
            loader.from_pretrained(tmp_path)
    finally:
        transformers_logging.set_verbosity(verbosity)


@pytest.mark.parametrize("loader", [OptVQModel, OptVQVQModel])
def test_a_folder_of_another_model_type_is_refused(loader, tmp_path):
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).save_pretrained(
        tmp_path)
    with pytest.raises(ValueError, match="'bert'"):
        loader.from_pretrained(tmp_path)


def test_a_diffusers_folder_of_another_class_is_refused(tmp_path):
    from diffusers import VQModel

    VQModel(block_out_channels=[8], norm_num_groups=8, latent_channels=3).save_pretrained(tmp_path)
    for loader in (OptVQModel, OptVQVQModel):
        with pytest.raises(ValueError, match="diffusers VQModel"):
            loader.from_pretrained(tmp_path)



@pytest.mark.parametrize("loader", [OptVQModel, OptVQVQModel])
@pytest.mark.parametrize("content", [b"\xff\xfe\x00binary", b"{not json", b"[1, 2]"])
def test_an_unreadable_config_json_names_the_file(loader, content, tmp_path):
    tiny().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match="config.json"):
        loader.from_pretrained(tmp_path)


@pytest.mark.parametrize("layout", ["transformers", "diffusers", "original"])
def test_a_corrupt_weights_file_names_the_folder(layout, tmp_path):
    if layout == "original":
        from test_convert_original import write_original_folder

        write_original_folder(tmp_path)
    else:
        save(layout, tiny(), tmp_path)
    weights_file(tmp_path).write_bytes(b"\x00\x01 not safetensors")
    if layout == "diffusers":  # diffusers' own error names the file
        with pytest.raises(OSError, match=r"Unable to load weights from checkpoint file.*diffusion_pytorch_model"):
            OptVQVQModel.from_pretrained(tmp_path)
    for loader in (OptVQModel,) if layout == "diffusers" else (OptVQModel, OptVQVQModel):
        with pytest.raises(ValueError, match=rf"{tmp_path.name} are not a readable safetensors file"):
            loader.from_pretrained(tmp_path)


def _original(**quantize_changes):
    from test_convert_original import original_config

    config = original_config()
    for key, value in quantize_changes.items():
        if value is None:
            config["quantize"].pop(key)
        else:
            config["quantize"][key] = value
    return config


@pytest.mark.parametrize("changes, match", [
    (dict(e_dim=None), "quantize.e_dim"),
    (dict(n_e=None), "quantize.n_e"),
    (dict(normalize_mode="weird"), "quantize.normalize_mode.*'weird'"),
    (dict(e_dim="sixteen"), "embed_dim"),
    (dict(num_head=3), "num_heads"),
])
def test_original_configs_with_bad_fields_name_the_file_and_field(changes, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        config_from_original(_original(**changes))
    (tmp_path / "config.json").write_text(json.dumps(_original(**changes)))
    with pytest.raises(ValueError, match=rf"config.json.*{match}|{tmp_path.name}.*{match}"):
        OptVQModel.from_pretrained(tmp_path)
    encoder_less = _original()
    del encoder_less["encoder"]["ch"], encoder_less["decoder"]["ch"]
    with pytest.raises(ValueError, match="encoder.ch"):
        config_from_original(encoder_less)


def test_an_original_folder_missing_a_tensor_is_refused_unless_asked(tmp_path):
    from test_convert_original import write_original_folder

    write_original_folder(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    tensors.pop("model.quantize.embedding.weight")
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"missing: \['quantizer.embedding.weight'\]"):
        OptVQModel.from_pretrained(tmp_path)
    loaded = OptVQModel.from_pretrained(tmp_path, initialize_missing_weights=True)
    assert torch.isfinite(loaded.quantizer.embedding.weight).all()


# ----------------------------------------------------------------------------------------------------------------
# Numerics: the Sinkhorn engine
# ----------------------------------------------------------------------------------------------------------------
def operands(dtype=torch.float64, rows=64, codes=16, dim=4):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(rows, dim, generator=generator, dtype=dtype),
            torch.randn(codes, dim, generator=generator, dtype=dtype))


ENGINE = [sinkhorn_assign, sinkhorn_plan, euclidean_argmin,
          lambda f, c: sinkhorn_assign(f, c, streaming=True)]


@pytest.mark.parametrize("engine", ENGINE)
@pytest.mark.parametrize("where, value", [("features", float("nan")), ("features", float("inf")),
                                          ("codebook", float("nan")), ("codebook", float("-inf"))])
def test_non_finite_inputs_raise(engine, where, value):
    features, codebook = operands(torch.float32)
    (features if where == "features" else codebook)[3, 1] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        engine(features, codebook)


@pytest.mark.parametrize("scale", [1e300, 1e-300, 1e30, 1e-30])
def test_float64_inputs_beyond_float32s_range_give_the_same_answer(scale):
    features, codebook = operands()
    torch.testing.assert_close(sinkhorn_plan(features * scale, codebook * scale), sinkhorn_plan(features, codebook))
    assigned = sinkhorn_assign(features * scale, codebook * scale)
    assert torch.equal(assigned, sinkhorn_assign(features, codebook)) and assigned.unique().numel() > 8
    # the nearest code, from an independent float64 computation
    assert torch.equal(euclidean_argmin(features * scale, codebook * scale), torch.cdist(features, codebook).argmin(1))
    with pytest.raises(ValueError, match="float32's range"):
        sinkhorn_assign(features * scale, codebook * scale, normalization="none")


def test_float32_values_whose_differences_overflow_raise():
    features, codebook = operands(torch.float32)
    with pytest.raises(ValueError, match="overflow"):
        sinkhorn_assign(features.abs() * 3e38, -codebook.abs() * 3e38)


@pytest.mark.parametrize("engine", ENGINE)
def test_zero_width_features_raise(engine):
    with pytest.raises(ValueError, match="at least one channel"):
        engine(torch.zeros(5, 0), torch.zeros(3, 0))


# ----------------------------------------------------------------------------------------------------------------
# Numerics: models and quantizers
# ----------------------------------------------------------------------------------------------------------------
def decoders(model):
    vqvae = OptVQVQModel.from_optvq(model)
    return {
        "OptVQModel.decode": lambda h: model.decode(h),
        "OptVQVQModel.decode": lambda h: vqvae.decode(h),
        "OptVQVQModel.decode(force_not_quantize)": lambda h: vqvae.decode(h, force_not_quantize=True),
    }


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_decoding_non_finite_latents_raises(value):
    model = tiny()
    latents = torch.zeros(1, model.config.embed_dim, 8, 8)
    latents[0, 0, 1, 1] = value
    for name, decode in decoders(model).items():
        with pytest.raises(ValueError, match="NaN or Inf"):
            decode(latents)


@pytest.mark.parametrize("architecture", ["vqgan", "simple_cnn"])
@pytest.mark.parametrize("training", [False, True])
def test_an_empty_batch_has_zero_loss(architecture, training):
    model = tiny(architecture).train(training)
    output = model(pixels(model)[:0])
    assert output.quantization_loss == 0 and output.reconstruction.shape[0] == 0 and output.code_counts.shape[0] == 0
    quantizer = build_quantizer(model.config).train(training)
    assert quantizer(torch.zeros(0, model.config.embed_dim, 4, 4)).loss == 0


@pytest.mark.parametrize("architecture", ["vqgan", "simple_cnn"])
@pytest.mark.parametrize("scale", [1e30, 3e38])
def test_pixels_far_outside_the_range_name_pixel_values(architecture, scale):
    model = tiny(architecture)
    vqvae = OptVQVQModel.from_optvq(model)
    bad = pixels(model).abs() * scale
    for run in (model, model.encode, vqvae, lambda x: vqvae.encode(x)):
        with pytest.raises(ValueError, match=r"`pixel_values`.*\[-1, 1\]"):
            run(bad)


def test_a_quantizer_refuses_features_whose_loss_would_overflow():
    quantizer = build_quantizer(tiny().config)
    with pytest.raises(ValueError, match="Features contain values of magnitude 1e\\+30"):
        quantizer(torch.full((1, 8, 2, 2), 1e30))
    assert torch.isfinite(quantizer(torch.full((1, 8, 2, 2), 1e6)).loss)


# ----------------------------------------------------------------------------------------------------------------
# Training outputs: atomic saves
# ----------------------------------------------------------------------------------------------------------------
KILLER = r"""
import json, os, signal, sys
import torch
torch.set_num_threads(1)  # no thread pool to inherit across fork
from optvq_hf import OptVQConfig, OptVQImageProcessor, OptVQModel
from optvq_hf.training import save_final_model

output_dir = sys.argv[1]
models = []
for size in (32, 64):  # two models whose weights do not fit each other's config
    config = OptVQConfig.from_preset("optvq-mnist", codebook_size=size, resolution=size)
    models.append((OptVQModel(config), OptVQImageProcessor.from_model_config(config)))
FILE_SYSTEM_CALLS = {open, os.open, os.replace, os.rename, os.link, os.unlink, os.remove, os.rmdir, os.mkdir,
                     os.symlink}


def kill_before_call(number):
    # SIGKILL this process just before its `number`-th file-system call (or the atomic exchange)
    calls = [0]

    def profile(frame, event, function):
        if (event == "c_call" and function in FILE_SYSTEM_CALLS) or (
            event == "call" and frame.f_code.co_name == "_exchange"
        ):
            calls[0] += 1
            if calls[0] == number:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.setprofile(profile)


save_final_model(*models[0], output_dir, model_card=False)
for point in range(1, 10_000):
    pid = os.fork()
    if pid == 0:  # the saving process, killed at one point of its save
        try:
            kill_before_call(point)
            save_final_model(*models[1], output_dir, model_card=False)
            sys.setprofile(None)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    model = OptVQModel.from_pretrained(output_dir)  # raises on weights that do not fit the config
    processor = json.load(open(os.path.join(output_dir, "preprocessor_config.json")))
    assert processor["crop_size"]["height"] == model.config.resolution == model.config.codebook_size
    if not os.WIFSIGNALED(status):  # the save ran to its end: every point has been tried
        assert model.config.codebook_size == 64
        print("kill points tried:", point - 1, flush=True)
        break
    assert os.WTERMSIG(status) == signal.SIGKILL
    save_final_model(*models[0], output_dir, model_card=False)  # back to the old model for the next point
"""


def _assert_one_complete_model(output_dir):
    model = OptVQModel.from_pretrained(output_dir)  # raises on weights that do not fit the config
    processor = json.loads((output_dir / "preprocessor_config.json").read_text())
    assert processor["crop_size"]["height"] == model.config.resolution == model.config.codebook_size
    assert (output_dir / "checkpoint-7" / "state.bin").read_bytes() == b"training state"
    assert (output_dir / "logs" / "events").read_text() == "log"


def _run_folder(tmp_path):
    output_dir = tmp_path / "run"
    (output_dir / "checkpoint-7").mkdir(parents=True)
    (output_dir / "checkpoint-7" / "state.bin").write_bytes(b"training state")
    (output_dir / "logs").mkdir()
    (output_dir / "logs" / "events").write_text("log")
    return output_dir


def test_a_killed_final_save_leaves_the_old_or_the_new_model(tmp_path):
    """A real process saving a model over one of another config, killed with SIGKILL before each of its file-system
    calls in turn (open, link, rename, the exchange, ...; forked from one interpreter, so that the test pays for one
    start-up): after every kill the folder loads as one complete model (config, weights and processor of the same
    save), and the run's other files (checkpoints, logs) are there."""
    import subprocess
    import sys

    output_dir = _run_folder(tmp_path)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    result = subprocess.run([sys.executable, str(script), str(output_dir)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split("kill points tried:")[1]) >= 10, result.stdout
    _assert_one_complete_model(output_dir)


def test_the_final_save_replaces_a_model_of_another_config_and_leaves_no_temporary_folder(tmp_path):
    from optvq_hf import OptVQImageProcessor
    from optvq_hf.training import save_final_model

    output_dir = _run_folder(tmp_path)
    for size in (32, 64):
        config = OptVQConfig.from_preset("optvq-mnist", codebook_size=size, resolution=size)
        save_final_model(OptVQModel(config), OptVQImageProcessor.from_model_config(config), str(output_dir))
        _assert_one_complete_model(output_dir)
        assert OptVQModel.from_pretrained(output_dir).config.codebook_size == size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert (output_dir / "README.md").is_file()


# ----------------------------------------------------------------------------------------------------------------
# Training data: unreadable images are skipped and counted
# ----------------------------------------------------------------------------------------------------------------
def _imagefolder(root, num_train=24, num_test=0, empty=()):
    """A real imagefolder (PNG files under `split/label/`), with 0-byte files at the training indices `empty`."""
    import numpy as np

    from training_helpers import smooth_image

    rng = np.random.default_rng(0)
    for split, count in (("train", num_train), ("test", num_test)):
        for index in range(count):
            path = root / split / "a" / f"{index:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            if split == "train" and index in empty:
                path.write_bytes(b"")
            else:
                smooth_image(rng, 18, 20, "L").save(path)
    return root


def _train(data_dir, output_dir, *extra):
    import run_train
    from training_helpers import tiny_args

    args = tiny_args(str(data_dir), str(output_dir), "--max_train_steps", "2", "--validation_steps", "100", *extra)
    args[args.index("--dataset_name")] = "--train_data_dir"
    if (data_dir / "test").exists():
        return run_train.main(args)
    index = args.index("--validation_split")
    return run_train.main(args[:index] + args[index + 2:])


@pytest.mark.parametrize("data_path", [["--cache_preprocessed", "never"], ["--streaming"]])
def test_unreadable_images_are_skipped_and_counted_on_every_data_path(data_path, tmp_path):
    """One 0-byte image in an imagefolder, decoded per sample or streamed: skipped and counted, never fatal (the
    cached path: tests/test_training.py::test_script_trains_evaluates_saves_and_counts_corrupt_images)."""
    data = _imagefolder(tmp_path / "data", num_test=8, empty=(5,))
    metrics = _train(data, tmp_path / "out", "--train_batch_size", "8", *data_path)
    assert metrics["global_step"] == 2 and metrics["skipped_train_images"] >= 1
    assert metrics["num_eval_images"] == 8


def test_an_unreadable_image_drawn_into_the_held_out_evaluation_set_is_replaced(tmp_path):
    """No test split: the evaluation image is held out of the training split. The image drawn first (for seed 42, the
    script's default) is a 0-byte file: it goes back to the training images (skipped and counted there) and a
    readable one is evaluated instead."""
    import numpy as np

    first_drawn = int(np.random.default_rng(42).permutation(24)[0])
    data = _imagefolder(tmp_path / "data", empty=(first_drawn,))
    metrics = _train(data, tmp_path / "out", "--validation_split_percentage", "1", "--seed", "42",
                     "--cache_preprocessed", "always")
    assert metrics["num_eval_images"] == 1 and metrics["skipped_eval_images"] == 0
    assert metrics["skipped_train_images"] == 1 and np.isfinite(metrics["psnr"])


def test_a_pickle_in_a_bin_checkpoint_is_never_run(tmp_path):
    """An original-layout folder whose only weights file is a `pytorch_model.bin` holding a pickled object that would
    run code when unpickled: loading refuses it (`weights_only=True`) and the code never runs."""
    import pickle

    from test_convert_original import original_config

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "config.json").write_text(json.dumps(original_config()))
    with open(tmp_path / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"model.quantize.embedding.weight": Exploit()}, handle)
    with pytest.raises(Exception, match="[Ww]eights only|weights_only|Unsupported"):
        OptVQModel.from_pretrained(tmp_path)
    assert not marker.exists()


def test_a_held_out_evaluation_set_holds_readable_images_only():
    import datasets

    from training_helpers import png_bytes, smooth_image
    from optvq_hf import OptVQImageProcessor
    from optvq_hf.training import ImagePreprocessor, split_train_and_eval

    import numpy as np

    image = {"bytes": png_bytes(smooth_image(np.random.default_rng(0), 18, 20, "L")), "path": None}
    rows = [{"bytes": b"", "path": None}] * 9 + [image]  # one readable image among ten
    train = datasets.Dataset.from_dict({"image": rows, "label": list(range(10))},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "label": datasets.Value("int64")}))
    preprocessor = ImagePreprocessor(OptVQImageProcessor(num_channels=1), 16, center_crop=True)
    for seed in range(3):
        rest, evaluation = split_train_and_eval(datasets.DatasetDict(train=train), eval_percentage=10, seed=seed,
                                                image_column="image", preprocessor=preprocessor)
        assert evaluation["label"] == [9] and sorted(rest["label"]) == list(range(9))
