#!/usr/bin/env python
"""OptVQVQModel (diffusers) vs OptVQModel (transformers): decode latency side by side, and the per-step cost of the
two stages of examples/train_latent_diffusion.py with its default sizes.

    python benchmarks/bench_diffusers_vq.py --repeats 30
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from optvq_hf import OptVQConfig, OptVQModel, OptVQVQModel


def timed(function, repeats):
    function()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return samples


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    # 1. decode latency: same modules, so the ratio should be ~1 (interleaved repeats)
    for preset, size in (("optvq-mnist", 32), ("optvq-cifar10", 32)):
        optvq = OptVQModel(OptVQConfig.from_preset(preset)).eval()
        vqvae = OptVQVQModel.from_optvq(optvq)
        images = torch.rand(args.batch_size, optvq.config.in_channels, size, size) * 2 - 1
        with torch.no_grad():
            latents = optvq.encode_latents(images)
            a_times, b_times = [], []
            for _ in range(args.repeats):
                a_times += timed(lambda: optvq.decode(optvq.quantize(latents).quantized), 1)
                b_times += timed(lambda: vqvae.decode(latents), 1)
        a, b = statistics.median(a_times), statistics.median(b_times)
        print(f"{preset} quantize+decode B={args.batch_size}: OptVQModel {a * 1e3:.1f} ms, OptVQVQModel "
              f"{b * 1e3:.1f} ms, ratio {b / a:.3f}")

    # 2. training-step cost of the latent-diffusion example (default sizes)
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_latent_diffusion.py"
    spec = importlib.util.spec_from_file_location("example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example_args = example.parse_args(["--output_dir", "unused"])

    model = OptVQModel(OptVQConfig.from_preset("optvq-mnist")).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    pixels = torch.rand(example_args.batch_size, 1, 32, 32) * 2 - 1

    def tokenizer_step():
        output = model(pixels)
        loss = F.mse_loss(output.reconstruction, pixels) + output.quantization_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    unet = example.build_unet(example_args, 8, 8).train()
    unet_optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    clean = torch.randn(example_args.batch_size, 8, 8, 8)

    def unet_step():
        noise = torch.randn_like(clean)
        steps = torch.randint(0, 1000, (clean.shape[0],))
        loss = F.mse_loss(unet(scheduler.add_noise(clean, noise, steps), steps).sample, noise)
        unet_optimizer.zero_grad()
        loss.backward()
        unet_optimizer.step()

    t_vq = statistics.median(timed(tokenizer_step, args.repeats))
    t_unet = statistics.median(timed(unet_step, args.repeats))
    total = example_args.vq_steps * t_vq + example_args.unet_steps * t_unet
    print(f"tokenizer step (B={example_args.batch_size}): {t_vq * 1e3:.0f} ms; UNet step: {t_unet * 1e3:.0f} ms; "
          f"defaults ({example_args.vq_steps} + {example_args.unet_steps} steps) -> {total:.0f} s of training")


if __name__ == "__main__":
    main()
