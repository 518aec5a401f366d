"""Helpers for the training tests: a tiny image dataset on disk and the tiny model's command line."""

from __future__ import annotations

import io
import os
import socket
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)



def free_port() -> int:
    """A TCP port nobody listens on now, so that concurrent multi-process tests never share a rendezvous port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TINY_OVERRIDES = "codebook_size=32,base_channels=8,latent_channels=8,embed_dim=8,num_heads=4,resolution=16"


def smooth_image(rng: np.random.Generator, height: int, width: int, mode: str = "L") -> Image.Image:
    """A random smooth image (sum of a few low-frequency waves), so that a tiny autoencoder can learn something."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = 3 if mode == "RGB" else 1
    out = np.zeros((height, width, channels), np.float32)
    for channel in range(channels):
        for _ in range(3):
            fy, fx, phase = rng.uniform(0.05, 0.4), rng.uniform(0.05, 0.4), rng.uniform(0, 6.28)
            out[..., channel] += np.sin(fy * y + fx * x + phase)
    out = (out - out.min()) / (out.max() - out.min() + 1e-6) * 255
    array = out.astype(np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode=mode)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_tiny_dataset(folder: str, num_train: int = 48, num_test: int = 12, corrupt: int = 1, seed: int = 0,
                       size: tuple[int, int] = (18, 20), mode: str = "L") -> str:
    """Parquet files `train-00000-of-00001.parquet` / `test-...` with an `image` column (the Hub layout), `corrupt`
    of the training rows holding bytes that are not an image. Returns the folder."""
    import datasets

    rng = np.random.default_rng(seed)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    os.makedirs(folder, exist_ok=True)
    for split, count in (("train", num_train), ("test", num_test)):
        records = [{"bytes": png_bytes(smooth_image(rng, size[0], size[1], mode)), "path": None} for _ in range(count)]
        if split == "train":
            for index in range(corrupt):
                records[index * 7 % count] = {"bytes": b"this is not an image" + bytes([index]), "path": None}
        dataset = datasets.Dataset.from_dict({"image": records, "label": list(range(count))}, features=features)
        dataset.to_parquet(os.path.join(folder, f"{split}-00000-of-00001.parquet"))
    return folder


def tiny_args(data_dir: str, output_dir: str, *extra: str) -> list[str]:
    """Command-line arguments of a tiny, fast training run on `write_tiny_dataset` data."""
    return [
        "--model_config_name_or_path", "optvq-mnist",
        "--config_overrides", TINY_OVERRIDES,
        "--dataset_name", data_dir,
        "--validation_split", "test",
        "--train_batch_size", "8",
        "--eval_batch_size", "16",
        "--report_to", "none",
        "--logging_steps", "2",
        "--num_threads", "1",
        "--output_dir", output_dir,
        *extra,
    ]
