#!/usr/bin/env python
"""Train a small unconditional latent-diffusion model on OptVQ latents and save it as a diffusers `LDMPipeline`.

Two stages, both with `accelerate` (one CPU process by default; `accelerate launch` for more):

1. an OptVQ tokenizer (`OptVQModel`, preset `optvq-mnist`: the paper's small CNN, 4 heads, 1024 codes) trained for
   reconstruction, unless `--vqvae` points at a trained one (an `OptVQVQModel`, `OptVQModel` or original-release
   folder);
2. a `UNet2DModel` trained to denoise the tokenizer's pre-quantization latents, scaled to unit variance by
   `scaling_factor` (computed on the data with `OptVQVQModel.fit_scaling_factor`).

The result is `LDMPipeline(vqvae=OptVQVQModel, unet, DDIMScheduler)` saved with `save_pretrained`; the script reloads
it with `LDMPipeline.from_pretrained` and writes `samples.png` from the reloaded pipeline.

Data: MNIST from the parquet files in `--mnist_dir` (the Hub's `ylecun/mnist` layout) when they exist, otherwise
scikit-image's bundled LFW faces (200 grayscale 25x25 crops, no download). Images are resized to 32x32 in [-1, 1].

Runs in a few minutes on a laptop CPU with the defaults::

    python examples/train_latent_diffusion.py --output_dir ./ldm-optvq-mnist
    python -c "from diffusers import LDMPipeline; LDMPipeline.from_pretrained('./ldm-optvq-mnist')(batch_size=4)"
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDIMScheduler, DDPMScheduler, LDMPipeline, UNet2DModel
from PIL import Image

from optvq_hf import OptVQConfig, OptVQModel, OptVQVQModel
from optvq_hf.training.runtime import several_processes_on_cpu

# No machine-specific default: a folder given with --mnist_dir or the OPTVQ_MNIST_DIR environment variable.
DEFAULT_MNIST_DIR = os.environ.get("OPTVQ_MNIST_DIR") or None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="Where the pipeline (and samples.png) is written.")
    parser.add_argument("--dataset", choices=("auto", "mnist", "skimage"), default="auto",
                        help="'auto': MNIST if --mnist_dir has its parquet files, else scikit-image's LFW faces.")
    parser.add_argument("--mnist_dir", default=DEFAULT_MNIST_DIR,
                        help="Folder with MNIST train-*.parquet (the Hub's ylecun/mnist layout), e.g. "
                             "../shared/datasets/mnist (default: $OPTVQ_MNIST_DIR; needed for --dataset mnist).")
    parser.add_argument("--num_images", type=int, default=8192, help="Training images to use (at most).")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--vqvae", default=None,
                        help="A trained tokenizer folder (OptVQVQModel, OptVQModel or original layout); skips stage 1.")
    parser.add_argument("--preset", default="optvq-mnist", help="OptVQConfig preset of the tokenizer of stage 1.")
    parser.add_argument("--vq_steps", type=int, default=600)
    parser.add_argument("--vq_lr", type=float, default=2e-3)
    parser.add_argument("--unet_steps", type=int, default=2500)
    parser.add_argument("--unet_lr", type=float, default=1e-3)
    parser.add_argument("--unet_channels", type=int, nargs=2, default=(32, 64), help="UNet block_out_channels.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_train_timesteps", type=int, default=1000)
    parser.add_argument("--num_samples", type=int, default=16, help="Images in samples.png.")
    parser.add_argument("--sample_steps", type=int, default=50, help="DDIM steps for samples.png.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log_every", type=int, default=100)
    args = parser.parse_args(argv)
    if args.dataset == "mnist" and not args.mnist_dir:
        parser.error("--dataset mnist needs --mnist_dir (a folder with MNIST train-*.parquet) or $OPTVQ_MNIST_DIR.")
    return args


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------
def _to_unit_range(images: np.ndarray, image_size: int) -> torch.Tensor:
    """`(N, H, W)` floats in [0, 1] -> `(N, 1, image_size, image_size)` in [-1, 1]."""
    tensor = torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None]
    if tensor.shape[-1] != image_size or tensor.shape[-2] != image_size:
        tensor = F.interpolate(tensor, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (tensor.clamp(0, 1) * 2 - 1).contiguous()


def load_mnist(mnist_dir: str, num_images: int, image_size: int) -> torch.Tensor:
    from datasets import load_dataset

    files = sorted(glob.glob(os.path.join(mnist_dir, "train-*.parquet")))
    if not files:
        raise FileNotFoundError(f"No train-*.parquet in {mnist_dir}.")
    dataset = load_dataset("parquet", data_files={"train": files}, split="train")
    dataset = dataset.select(range(min(num_images, len(dataset))))
    images = np.stack([np.asarray(image.convert("L"), dtype=np.float32) / 255.0 for image in dataset["image"]])
    return _to_unit_range(images, image_size)


def load_skimage_faces(num_images: int, image_size: int) -> torch.Tensor:
    """scikit-image's bundled LFW subset (200 faces), doubled by horizontal flips."""
    from skimage import data

    faces = data.lfw_subset().astype(np.float32)  # (200, 25, 25) in [0, 1]
    faces = np.concatenate([faces, faces[:, :, ::-1]])
    return _to_unit_range(faces[:num_images], image_size)


def load_images(args) -> tuple[torch.Tensor, str]:
    use_mnist = args.dataset == "mnist" or (
        args.dataset == "auto" and args.mnist_dir and glob.glob(os.path.join(args.mnist_dir, "train-*.parquet"))
    )
    if use_mnist:
        return load_mnist(args.mnist_dir, args.num_images, args.image_size), f"MNIST ({args.mnist_dir})"
    return load_skimage_faces(args.num_images, args.image_size), "scikit-image LFW faces"


def infinite_batches(loader):
    while True:
        yield from loader


# --------------------------------------------------------------------------------------------------------------
# Stage 1: the OptVQ tokenizer
# --------------------------------------------------------------------------------------------------------------
def train_tokenizer(args, accelerator: Accelerator, images: torch.Tensor) -> OptVQModel:
    config = OptVQConfig.from_preset(args.preset, resolution=args.image_size)
    if config.in_channels != images.shape[1]:
        raise ValueError(
            f"Preset {args.preset!r} expects {config.in_channels} channels, the data has {images.shape[1]}."
        )
    model = OptVQModel(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.vq_lr)
    loader = torch.utils.data.DataLoader(images, batch_size=args.batch_size, shuffle=True, drop_last=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    batches = infinite_batches(loader)
    start = time.perf_counter()
    for step in range(1, args.vq_steps + 1):
        pixels = next(batches)
        output = model(pixels)
        reconstruction_loss = F.mse_loss(output.reconstruction, pixels)
        loss = reconstruction_loss + output.quantization_loss
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        if step % args.log_every == 0 or step == args.vq_steps:
            accelerator.print(
                f"[tokenizer] step {step}/{args.vq_steps} mse {reconstruction_loss.item():.4f} "
                f"quant {output.quantization_loss.item():.4f} usage {output.codebook_usage.item():.2f} "
                f"({time.perf_counter() - start:.0f}s)"
            )
    return accelerator.unwrap_model(model).eval()


# --------------------------------------------------------------------------------------------------------------
# Stage 2: the latent UNet
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_dataset(vqvae: OptVQVQModel, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Pre-quantization latents times `scaling_factor` (what the diffusion model learns to generate)."""
    latents = [vqvae.encode(chunk.to(vqvae.device)).latents.cpu() for chunk in images.split(batch_size)]
    return torch.cat(latents) * vqvae.config.scaling_factor


def build_unet(args, latent_channels: int, latent_size: int) -> UNet2DModel:
    first, second = args.unet_channels
    return UNet2DModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=(first, second),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )


def train_unet(args, accelerator: Accelerator, latents: torch.Tensor) -> tuple[UNet2DModel, DDPMScheduler]:
    unet = build_unet(args, latents.shape[1], latents.shape[-1])
    # clip_sample=False: the scaled latents are unit-variance, so clipping predicted latents to [-1, 1] (the image-space
    # default) would destroy a third of them at sampling time.
    noise_scheduler = DDPMScheduler(num_train_timesteps=args.num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                                    clip_sample=False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=0.0)
    def warmup_cosine(step: int) -> float:
        return min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / max(1, args.unet_steps)))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
    loader = torch.utils.data.DataLoader(latents, batch_size=args.batch_size, shuffle=True, drop_last=True)
    unet, optimizer, loader, lr_schedule = accelerator.prepare(unet, optimizer, loader, lr_schedule)
    unet.train()
    batches = infinite_batches(loader)
    start, running = time.perf_counter(), []
    for step in range(1, args.unet_steps + 1):
        clean = next(batches)
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, args.num_train_timesteps, (clean.shape[0],), device=clean.device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        running.append(loss.item())
        if step % args.log_every == 0 or step == args.unet_steps:
            accelerator.print(
                f"[unet] step {step}/{args.unet_steps} loss {np.mean(running):.4f} ({time.perf_counter() - start:.0f}s)"
            )
            running = []
    return accelerator.unwrap_model(unet).eval(), noise_scheduler


def save_grid(images: np.ndarray, path: str):
    """`(N, H, W, C)` floats in [0, 1] -> one PNG grid."""
    count, height, width, channels = images.shape
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.zeros((rows * height, columns * width, channels), dtype=np.float32)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid[row * height:(row + 1) * height, column * width:(column + 1) * width] = image
    grid = (grid * 255).round().astype(np.uint8)
    Image.fromarray(grid[..., 0] if channels == 1 else grid).save(path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=several_processes_on_cpu())  # torchrun on CPU: gloo, not N lone processes
    set_seed(args.seed)
    started = time.perf_counter()

    images, source = load_images(args)
    accelerator.print(f"data: {len(images)} images from {source}, shape {tuple(images.shape[1:])}")

    if args.vqvae:
        vqvae = OptVQVQModel.from_pretrained(args.vqvae).to(accelerator.device).eval()
    else:
        vqvae = OptVQVQModel.from_optvq(train_tokenizer(args, accelerator, images)).eval()
    with torch.no_grad():
        probe = images[: min(256, len(images))].to(vqvae.device)  # training images: a fit check, not a held-out score
        reconstruction_mse = F.mse_loss(vqvae(probe).sample.clamp(-1, 1), probe).item()
    scaling_factor = vqvae.fit_scaling_factor(images[: min(2048, len(images))].split(args.batch_size))
    accelerator.print(f"tokenizer reconstruction mse {reconstruction_mse:.4f}; scaling_factor {scaling_factor:.4f}")

    latents = encode_dataset(vqvae, images, args.batch_size)
    accelerator.print(f"latents {tuple(latents.shape[1:])}, std after scaling {latents.std().item():.3f}")
    unet, noise_scheduler = train_unet(args, accelerator, latents)

    summary = {}
    if accelerator.is_main_process:
        scheduler = DDIMScheduler.from_config(noise_scheduler.config)
        LDMPipeline(vqvae=vqvae.cpu(), unet=unet.cpu(), scheduler=scheduler).save_pretrained(args.output_dir)
        pipeline = LDMPipeline.from_pretrained(args.output_dir)
        pipeline.set_progress_bar_config(disable=True)
        samples = pipeline(batch_size=args.num_samples, num_inference_steps=args.sample_steps,
                           generator=torch.manual_seed(args.seed), output_type="np").images
        save_grid(samples, os.path.join(args.output_dir, "samples.png"))
        summary = {
            "data": source,
            "num_images": len(images),
            "tokenizer_reconstruction_mse": reconstruction_mse,
            "scaling_factor": scaling_factor,
            "vq_steps": 0 if args.vqvae else args.vq_steps,
            "unet_steps": args.unet_steps,
            "sample_seed": args.seed,
            "sample_steps": args.sample_steps,
            "num_samples": args.num_samples,
            "seconds": round(time.perf_counter() - started, 1),
        }
        with open(os.path.join(args.output_dir, "training_summary.json"), "w") as handle:
            json.dump(summary, handle, indent=2)
        accelerator.print(f"saved the pipeline and samples.png to {args.output_dir} ({summary['seconds']}s)")
    accelerator.wait_for_everyone()
    return summary


if __name__ == "__main__":
    main()
