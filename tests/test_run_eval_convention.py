"""run_eval.py --metric_convention paper: the paper's Y-channel PSNR / SSIM on RGB data, stated in results.json and
the model card (tiny model, tiny RGB parquet dataset, no network)."""

import importlib.util
import io
import json
import os

import datasets
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from optvq_hf import OptVQConfig, OptVQImageProcessor, OptVQModel
from test_metric_conventions import reference_paper_psnr, reference_paper_ssim
from training_helpers import ROOT, write_tiny_dataset


@pytest.fixture(scope="module")
def rgb_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_eval_rgb")
    data_dir = write_tiny_dataset(str(root / "rgb"), num_train=1, num_test=6, corrupt=0, size=(32, 32), mode="RGB")
    torch.manual_seed(0)
    config = OptVQConfig.from_preset("optvq-cifar10", codebook_size=64, base_channels=8, latent_channels=8)
    model = OptVQModel(config).eval()
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    processor = OptVQImageProcessor.from_model_config(config)
    processor.save_pretrained(model_dir)
    spec = importlib.util.spec_from_file_location("run_eval", os.path.join(ROOT, "examples", "run_eval.py"))
    run_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_eval)
    images = [Image.open(io.BytesIO(record["bytes"])).convert("RGB") for record in
              datasets.Dataset.from_parquet(os.path.join(data_dir, "test-00000-of-00001.parquet"))
              .cast_column("image", datasets.Image(decode=False))["image"]]
    return run_eval, str(model_dir), data_dir, model, processor, images


def test_paper_convention_scores_the_y_channel_and_says_so(rgb_setup, tmp_path):
    run_eval, model_dir, data_dir, model, processor, images = rgb_setup
    common = ["--model", model_dir, "--dataset_name", data_dir, "--split", "test", "--batch_size", "4",
              "--metrics", "psnr,ssim"]
    paper = run_eval.main([*common, "--output_dir", str(tmp_path / "paper"), "--metric_convention", "paper"])
    plain = run_eval.main([*common, "--output_dir", str(tmp_path / "plain"), "--no_model_card"])

    # Independent: reconstruct with the model, clamp to [0, 1], score with the references written in the tests.
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reconstruction = model(pixel_values).reconstruction
    to_unit = lambda t: ((t.double() + 1) / 2).clamp(0, 1)  # noqa: E731
    predictions, references = to_unit(reconstruction), to_unit(pixel_values)
    assert paper["psnr"] == pytest.approx(float(reference_paper_psnr(predictions, references).mean()), abs=1e-4)
    assert paper["ssim"] == pytest.approx(float(reference_paper_ssim(predictions, references).mean()), abs=1e-3)
    assert abs(paper["psnr"] - plain["psnr"]) > 0.05
    assert (paper["metric_convention"], plain["metric_convention"]) == ("paper", "rgb")
    assert json.loads((tmp_path / "paper" / "results.json").read_text())["metric_convention"] == "paper"

    card = ModelCard.load(os.path.join(model_dir, "README.md"))
    configs = {result.metric_type: result.metric_config for result in card.data.eval_results}
    assert configs["psnr"] == configs["ssim"] == "paper"
    assert "PSNR and SSIM (`paper` convention)" in card.text
