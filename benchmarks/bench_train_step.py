"""Side-by-side training step of OptVQ and VQ on the same network: the Sinkhorn assignment's cost in a real step.

Both models (`optvq-mnist` and its VQ baseline with one head, as in the original code's configs) are built in one
process and their steps (forward, L1 reconstruction + quantization loss, backward, AdamW) are interleaved, so machine
noise hits both alike; the medians and their ratio are printed.

    python benchmarks/bench_train_step.py --repeats 15
    python benchmarks/bench_train_step.py --members optvq,otvae   # OT-VAE's step against OptVQ's
    python benchmarks/bench_train_step.py --members optvq,otvae,otvae_eager   # and its eager training pass
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_train_step.py   # as examples/run_train.py runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from optvq_hf import OptVQConfig, OptVQModel
from optvq_hf.sinkhorn import set_block_policy

# as examples/run_train.py: the engine's CPU blocks follow how OpenMP threads wait
set_block_policy("passive" if os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE" else "active")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="optvq-mnist")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--members", default="optvq,vq",
                        help="Comma-separated: optvq (the preset), vq (its baseline: one head), otvae (the preset's "
                             "network with quantizer_type='otvae'; its training pass as training_kernel='auto' picks) "
                             "and otvae_eager (the same with training_kernel='eager').")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed seconds per step; cpu: the process's CPU seconds (all threads) per step, "
                             "less sensitive to other processes on a shared machine.")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    torch.manual_seed(0)
    builders = {
        "optvq": lambda: OptVQConfig.from_preset(args.preset),
        "vq": lambda: OptVQConfig.from_preset(args.preset, quantizer_type="vq", num_heads=1),
        "otvae": lambda: OptVQConfig.from_preset(args.preset, quantizer_type="otvae"),
        "otvae_eager": lambda: OptVQConfig.from_preset(args.preset, quantizer_type="otvae"),
    }
    models = {name: OptVQModel(builders[name]()).train() for name in args.members.split(",")}
    if "otvae_eager" in models:
        models["otvae_eager"].quantizer.training_kernel = "eager"
    config = next(iter(models.values())).config
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    pixels = torch.rand(args.batch_size, config.in_channels, config.resolution, config.resolution) * 2 - 1

    def step(name):
        output = models[name](pixel_values=pixels)
        ((output.reconstruction - pixels).abs().mean() + output.quantization_loss).backward()
        optimizers[name].step()
        optimizers[name].zero_grad()

    first_step = {}
    for name in models:  # warm-up; the first step includes any one-time compilation (OT-VAE's compiled kernels)
        start = time.perf_counter()
        step(name)
        first_step[name] = time.perf_counter() - start
        step(name)
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name in models:
            start = clock()
            step(name)
            times[name].append(clock() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    first = next(iter(median))
    print(
        f"{args.preset}, batch {args.batch_size}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, {args.clock} clock: "
        + ", ".join(f"{name} {value:.3f} s/step ({value / median[first]:.2f}x {first})" for name, value in median.items())
    )
    print("first step (one-time set-up, compilation included): "
          + ", ".join(f"{name} {value:.1f} s" for name, value in first_step.items()))

if __name__ == "__main__":
    main()
