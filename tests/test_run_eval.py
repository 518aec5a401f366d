"""examples/run_eval.py end to end on a tiny model and a tiny parquet dataset (no network)."""

import importlib.util
import io
import json
import os

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from optvq_hf import OptVQConfig, OptVQImageProcessor, OptVQModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
    spec = importlib.util.spec_from_file_location("run_eval", os.path.join(ROOT, "examples", "run_eval.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("run_eval")
    rng = np.random.default_rng(0)
    rows = []
    for index in range(10):
        array = (rng.random((28, 28)) * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array, mode="L").save(buffer, format="PNG")
        rows.append({"image": {"bytes": buffer.getvalue(), "path": None}, "label": index % 10})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    data_dir = root / "digits"
    data_dir.mkdir()
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(data_dir / "test-00000-of-00001.parquet"))
    torch.manual_seed(0)
    config = OptVQConfig.from_preset("optvq-mnist", codebook_size=64, base_channels=8, latent_channels=8)
    model = OptVQModel(config).eval()
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    OptVQImageProcessor.from_model_config(config).save_pretrained(model_dir)
    return _load_script(), str(model_dir), str(data_dir), model


def test_results_pictures_and_model_card(setup, tmp_path):
    run_eval, model_dir, data_dir, model = setup
    card_before = ModelCard.load(os.path.join(model_dir, "README.md"))
    results = run_eval.main(["--model", model_dir, "--dataset_name", data_dir, "--split", "test",
                             "--output_dir", str(tmp_path / "out"), "--batch_size", "4", "--max_eval_samples", "9",
                             "--compare_assignments"])
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    for key in ("psnr", "ssim", "codebook_usage", "perplexity", "num_samples", "dead_codes"):
        assert key in on_disk
    assert on_disk["num_samples"] == 9 and 0 < on_disk["codebook_usage"] <= 1
    assert on_disk["psnr_nearest"] == pytest.approx(on_disk["psnr"])

    # Independent PSNR: preprocess, reconstruct, compare with scikit-image.
    import datasets

    images = datasets.load_dataset("parquet", data_files=os.path.join(data_dir, "*.parquet"), split="train")["image"][:9]
    pixels = OptVQImageProcessor.from_pretrained(model_dir)(images, return_tensors="pt").pixel_values
    with torch.no_grad():
        out = model(pixels)
    recon = ((out.reconstruction.clamp(-1, 1) + 1) / 2).double().numpy()
    ref = ((pixels + 1) / 2).double().numpy()
    expected = np.mean([peak_signal_noise_ratio(r, p, data_range=1.0) for r, p in zip(ref, recon)])
    assert on_disk["psnr"] == pytest.approx(expected, abs=1e-4)
    # Token agreement: Sinkhorn over each evaluation batch of 4 (4, 4, 1 images) against the nearest codes.
    quantizer, saved = model.quantizer, model.quantizer.inference_assignment
    with torch.no_grad():
        latents = model.encode_latents(pixels)
        quantizer.inference_assignment = "sinkhorn"
        sinkhorn = torch.cat([quantizer(latents[i:i + 4]).token_ids for i in range(0, 9, 4)])
        quantizer.inference_assignment = saved
    agreement = float((sinkhorn == out.token_ids).double().mean())
    assert 0 < agreement < 1 and on_disk["token_agreement"] == pytest.approx(agreement, abs=1e-12)
    counts = np.load(tmp_path / "out" / "code_counts.npy")
    assert counts.sum() == on_disk["num_tokens"] == 9 * out.token_ids[0].numel()
    assert on_disk["codebook_usage"] == pytest.approx((counts > 0).mean())

    histogram = Image.open(tmp_path / "out" / "code_usage.png")
    side = Image.open(tmp_path / "out" / "reconstructions.png")
    assert histogram.size[0] > 100 and 2 * side.size[0] == 9 * side.size[1]

    card = ModelCard.load(os.path.join(model_dir, "README.md"))
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics["psnr"] == pytest.approx(on_disk["psnr"]) and metrics["codebook_usage"] == on_disk["codebook_usage"]
    assert all(r.dataset_split == "test" and r.dataset_name == "digits" for r in card.data.eval_results)
    assert "## Evaluation" in card.text and "## Usage" in card.text
    assert card.data.license == card_before.data.license
    # A second evaluation replaces the entries instead of appending duplicates.
    run_eval.main(["--model", model_dir, "--dataset_name", data_dir, "--output_dir", str(tmp_path / "out2"),
                   "--max_eval_samples", "5", "--metrics", "psnr"])
    card = ModelCard.load(os.path.join(model_dir, "README.md"))
    assert sum(r.metric_type == "psnr" for r in card.data.eval_results) == 1
    assert card.text.count("## Evaluation") == 1


def test_argument_errors(setup, tmp_path):
    run_eval, model_dir, data_dir, _ = setup
    with pytest.raises(SystemExit):
        run_eval.parse_args(["--model", model_dir, "--dataset_name", data_dir, "--output_dir", "x",
                             "--metrics", "psnr,lpips"])
    with pytest.raises(SystemExit):
        run_eval.parse_args(["--model", model_dir, "--dataset_name", data_dir, "--output_dir", "x",
                             "--metrics", "psnr,bleu"])
    with pytest.raises(ValueError, match="split"):
        run_eval.main(["--model", model_dir, "--dataset_name", data_dir, "--split", "validation",
                       "--output_dir", str(tmp_path / "o")])


def test_the_training_data_path_streaming_one_file_and_unreadable_images(setup, tmp_path):
    """run_eval reads data through optvq_hf.training's loader: one parquet file is the requested split, streaming
    gives the same numbers, and an unreadable image is skipped and counted instead of failing the run."""
    import datasets

    run_eval, model_dir, data_dir, _ = setup
    split = datasets.load_dataset("parquet", data_files=os.path.join(data_dir, "*.parquet"), split="train")
    rows = split.cast_column("image", datasets.Image(decode=False)).to_list()
    rows.insert(3, {"image": {"bytes": b"this is not an image", "path": None}, "label": -1})
    single_file = tmp_path / "with-corrupt.parquet"
    datasets.Dataset.from_list(rows, features=split.features).to_parquet(str(single_file))

    common = ["--model", model_dir, "--split", "test", "--metrics", "psnr,usage", "--no_model_card",
              "--batch_size", "4"]
    clean = run_eval.main([*common, "--dataset_name", data_dir, "--output_dir", str(tmp_path / "clean")])
    assert clean["num_samples"] == 10 and clean["skipped_images"] == 0
    for extra in ([], ["--streaming"]):
        out = tmp_path / f"file{len(extra)}"
        result = run_eval.main([*common, "--dataset_name", str(single_file), "--output_dir", str(out), *extra])
        assert result["num_samples"] == 10 and result["skipped_images"] == 1
        assert result["psnr"] == clean["psnr"] and result["perplexity"] == clean["perplexity"]
        assert np.array_equal(np.load(out / "code_counts.npy"), np.load(tmp_path / "clean" / "code_counts.npy"))
    limited = run_eval.main([*common, "--dataset_name", str(single_file), "--output_dir", str(tmp_path / "lim"),
                             "--streaming", "--max_eval_samples", "5"])
    assert limited["num_samples"] == 4 and limited["skipped_images"] == 1


@pytest.mark.slow
def test_two_processes_split_the_images_and_only_the_main_one_writes(setup, tmp_path):
    """torchrun with 2 CPU processes (gloo): each process evaluates its own share (image i on process i % 2), the
    metrics are reduced over both, and only process 0 writes results and the model card. The numbers equal one
    process's (the token counts exactly; PSNR / SSIM / LPIPS up to the model's float32 rounding, which depends on
    how the images are batched)."""
    import shutil
    import subprocess
    import sys

    from optvq_hf.metrics.networks import LPIPSNetwork
    from training_helpers import free_port

    _, model_dir, data_dir, _ = setup
    model_copy = str(tmp_path / "model")
    shutil.copytree(model_dir, model_copy)
    torch.manual_seed(0)
    LPIPSNetwork(stages=[[4], [6, 6]], in_channels=3).save_pretrained(tmp_path / "lpips")
    common = ["--model", model_copy, "--dataset_name", data_dir, "--split", "test", "--batch_size", "2",
              "--max_eval_samples", "9", "--metrics", "psnr,ssim,lpips,usage", "--lpips_model", str(tmp_path / "lpips")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), os.path.join(ROOT, "examples", "run_eval.py"), *common,
         "--output_dir", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    log = completed.stdout + completed.stderr
    assert completed.returncode == 0, log[-3000:]
    assert log.count("Updated the model card") == 1 and log.count("run_eval: Results:") == 1, log[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    card = ModelCard.load(os.path.join(model_copy, "README.md"))
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["psnr"] == pytest.approx(two["psnr"])

    one = _load_script().main([*common, "--output_dir", str(tmp_path / "one"), "--no_model_card"])
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert two["num_samples"] == one["num_samples"] == 9 and two["num_tokens"] == one["num_tokens"]
    assert np.array_equal(np.load(tmp_path / "two" / "code_counts.npy"), np.load(tmp_path / "one" / "code_counts.npy"))
    for key in ("psnr", "ssim", "lpips", "perplexity"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
