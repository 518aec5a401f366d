"""Side-by-side training step of OptVQ and VQ on the same network: the Sinkhorn assignment's cost in a real step.

Both models (`optvq-mnist` and its VQ baseline with one head, as in the original code's configs) are built in one
process and their steps (forward, L1 reconstruction + quantization loss, backward, AdamW) are interleaved, so machine
noise hits both alike; the medians and their ratio are printed.

    python benchmarks/bench_train_step.py --repeats 15
    python benchmarks/bench_train_step.py --members optvq,otvae   # OT-VAE's step against OptVQ's
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
                        help="Comma-separated: optvq (the preset), vq (its baseline: one head) and otvae (the preset's "
                             "network with quantizer_type='otvae').")
    args = parser.parse_args()

    torch.manual_seed(0)
    builders = {
        "optvq": lambda: OptVQConfig.from_preset(args.preset),
        "vq": lambda: OptVQConfig.from_preset(args.preset, quantizer_type="vq", num_heads=1),
        "otvae": lambda: OptVQConfig.from_preset(args.preset, quantizer_type="otvae"),
    }
    models = {name: OptVQModel(builders[name]()).train() for name in args.members.split(",")}
    config = next(iter(models.values())).config
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    pixels = torch.rand(args.batch_size, config.in_channels, config.resolution, config.resolution) * 2 - 1

    def step(name):
        output = models[name](pixel_values=pixels)
        ((output.reconstruction - pixels).abs().mean() + output.quantization_loss).backward()
        optimizers[name].step()
        optimizers[name].zero_grad()

    for name in models:  # warm-up
        step(name)
        step(name)
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name in models:
            start = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    first = next(iter(median))
    print(
        f"{args.preset}, batch {args.batch_size}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}: "
        + ", ".join(f"{name} {value:.3f} s/step ({value / median[first]:.2f}x {first})" for name, value in median.items())
    )

if __name__ == "__main__":
    main()
