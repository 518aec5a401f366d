#!/usr/bin/env python
"""How the encoder's latents, the codebook and the codes in use evolve in the first steps of training: the probe
behind docs/training.md, "Reproducing Table 2" (why the `"ce"` VQ baseline diverges where `"l2"` does not).

One process, run_train's pieces (AdamW with the original parameter groups, OneCycle with 1 % warm-up over
`--schedule_steps`, clipping at 1.0, L1 + L2 + quantization loss, k-means codebook initialization), batches drawn at
random from the first `--max_images` training images. Every `--every` steps it prints one JSON line: the loss terms,
the largest latent magnitude and the latents' RMS, the codebook's RMS, the codes the batch used, the gradient norm
before clipping, the learning rate and the norms of the encoder's conv weights. It stops early once the latents
pass 1e14.

    python benchmarks/vq_latent_growth.py --preset vq-mnist --quantization_loss ce --steps 450      # diverges
    python benchmarks/vq_latent_growth.py --preset vq-mnist --quantization_loss l2 --steps 300      # stays bounded
    python benchmarks/vq_latent_growth.py --preset vq-mnist --batch_size 1024 --learning_rate 4.608e-3 \
        --schedule_steps 5860 --steps 150                                # the paper's own recipe for the baseline
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from optvq_hf import OptVQConfig, OptVQImageProcessor, OptVQModel
from optvq_hf.training import (
    ImagePreprocessor, OptVQLoss, build_optimizer, build_param_groups, build_scheduler, decode_image_column,
    find_image_column, initialize_codebook, load_image_dataset, to_pixel_values,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from table2 import DEFAULT_DATA  # noqa: E402  (../shared/datasets/mnist beside the checkout, else ylecun/mnist)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_name", default=DEFAULT_DATA, help="MNIST (a local parquet folder or a Hub id).")
    parser.add_argument("--preset", default="vq-mnist")
    parser.add_argument("--quantization_loss", default="ce", choices=("ce", "l2", "l1"))
    parser.add_argument("--config_overrides", default="", help="key=value,... (ints and floats parsed).")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=2.88e-4 * 32, help="Peak learning rate (absolute).")
    parser.add_argument("--schedule_steps", type=int, default=12000, help="Length of the OneCycle schedule.")
    parser.add_argument("--steps", type=int, default=450, help="Steps to run (at most the schedule's).")
    parser.add_argument("--max_images", type=int, default=20000)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _overrides(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        key, value = part.split("=", 1)
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                pass
        out[key.strip()] = value
    return out


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    config = OptVQConfig.from_preset(args.preset, quantization_loss=args.quantization_loss,
                                     **_overrides(args.config_overrides))
    split = load_image_dataset(args.dataset_name, split="train")
    split = split.select(range(min(args.max_images, len(split))))
    preprocessor = ImagePreprocessor(OptVQImageProcessor.from_model_config(config), config.resolution,
                                     center_crop=True)
    images, _ = decode_image_column(split, find_image_column(split.features), preprocessor)
    model = OptVQModel(config).train()
    generator = torch.Generator().manual_seed(args.seed)
    first = (to_pixel_values(images[torch.randint(0, len(images), (args.batch_size,), generator=generator)])
             for _ in range(8))
    initialize_codebook(model, first, "kmeans", num_iters=30, seed=args.seed)
    loss_fn = OptVQLoss()
    optimizer = build_optimizer(build_param_groups(model, args.learning_rate, 0.05, 1.0), betas=(0.9, 0.999),
                                eps=1e-7)
    scheduler = build_scheduler("onecycle", optimizer, args.schedule_steps, None, 0.01)
    records = []
    for step in range(1, min(args.steps, args.schedule_steps) + 1):
        pixels = to_pixel_values(images[torch.randint(0, len(images), (args.batch_size,), generator=generator)])
        output = model(pixels)
        losses = loss_fn.generator_loss(pixels, output.reconstruction, output.quantization_loss, step)
        optimizer.zero_grad(set_to_none=True)
        losses.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % args.every and step != 1:
            continue
        with torch.no_grad():
            latents = output.latents
            record = {
                "step": step, "loss": float(losses.loss), "quantization": float(output.quantization_loss),
                "l2": float(losses.l2), "latent_max": float(latents.abs().amax()),
                "latent_rms": float(latents.pow(2).mean().sqrt()),
                "codebook_rms": float(model.quantizer.codebook.pow(2).mean().sqrt()),
                "codes_used": int((output.code_counts.sum(0) > 0).sum()), "grad_norm": float(grad_norm),
                "lr": scheduler.get_last_lr()[0],
                "encoder_conv_norms": [round(float(p.norm()), 2) for name, p in model.named_parameters()
                                       if name.startswith("encoder") and p.ndim == 4],
            }
        records.append(record)
        print(json.dumps(record), flush=True)
        if not math.isfinite(record["latent_max"]) or record["latent_max"] > 1e14:
            break
    return records


if __name__ == "__main__":
    main()
