"""examples/train_latent_diffusion.py at tiny size: both stages run, the saved LDMPipeline reloads and reproduces
the samples the script wrote, and a second run reuses the trained tokenizer through `--vqvae`."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("skimage")

from diffusers import LDMPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from optvq_hf import OptVQVQModel  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_latent_diffusion.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_latent_diffusion", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--dataset", "skimage", "--num_images", "32", "--batch_size", "8", "--vq_steps", "3", "--unet_steps", "3",
        "--unet_channels", "8", "16", "--num_samples", "2", "--sample_steps", "2", "--num_train_timesteps", "20",
        "--log_every", "1"]


@pytest.mark.slow
def test_example_trains_saves_and_reloads(tmp_path):
    example = load_example()
    output = tmp_path / "ldm"
    summary = example.main(["--output_dir", str(output), *TINY])
    assert summary["data"] == "scikit-image LFW faces" and summary["num_images"] == 32
    assert json.loads((output / "training_summary.json").read_text()) == summary

    pipeline = LDMPipeline.from_pretrained(output)
    assert type(pipeline.vqvae) is OptVQVQModel
    assert pipeline.vqvae.config.scaling_factor == pytest.approx(summary["scaling_factor"])
    assert pipeline.unet.config.in_channels == pipeline.vqvae.config.vq_embed_dim
    assert pipeline.scheduler.config.clip_sample is False  # unit-variance latents must not be clipped to [-1, 1]
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 32, 32, 1)
    # samples.png is the same two images side by side, written by the script from its reloaded pipeline
    grid = np.asarray(Image.open(output / "samples.png"), dtype=np.float32) / 255
    np.testing.assert_allclose(grid, np.concatenate([images[0, ..., 0], images[1, ..., 0]], axis=1), atol=1 / 255)

    # the scale makes the training latents unit-variance on the data it was computed on
    data = example.load_skimage_faces(32, 32)
    with torch.no_grad():
        scaled = pipeline.vqvae.encode(data).latents * pipeline.vqvae.config.scaling_factor
    assert scaled.std().item() == pytest.approx(1.0, rel=1e-4)

    # stage 1 can be skipped by pointing --vqvae at a trained tokenizer (here the one just saved)
    again = example.main(["--output_dir", str(tmp_path / "ldm2"), "--vqvae", str(output / "vqvae"), *TINY])
    assert again["vq_steps"] == 0
    reloaded = OptVQVQModel.from_pretrained(tmp_path / "ldm2" / "vqvae")
    for key, value in pipeline.vqvae.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value)


def test_mnist_folder_has_no_machine_specific_default(tmp_path, monkeypatch):
    """--mnist_dir comes from the command line or $OPTVQ_MNIST_DIR, never from a path of the machine the example was
    written on: without either, 'auto' falls back to the bundled faces and '--dataset mnist' is a usage error."""
    monkeypatch.delenv("OPTVQ_MNIST_DIR", raising=False)
    example = load_example()
    assert example.DEFAULT_MNIST_DIR is None
    args = example.parse_args(["--output_dir", str(tmp_path), "--num_images", "4"])
    assert args.mnist_dir is None
    images, description = example.load_images(args)
    assert description == "scikit-image LFW faces" and images.shape == (4, 1, 32, 32)
    with pytest.raises(SystemExit):
        example.parse_args(["--output_dir", str(tmp_path), "--dataset", "mnist"])
    monkeypatch.setenv("OPTVQ_MNIST_DIR", str(tmp_path / "mnist"))
    assert load_example().parse_args(["--output_dir", str(tmp_path)]).mnist_dir == str(tmp_path / "mnist")
