"""This checkout's optvq_hf against another version of it (e.g. main), side by side in one process.

The other version's `src/optvq_hf` is imported under another name, both build the same models with the same weights,
and their steps alternate (A B A B ...), so the machine's drift hits both alike; medians and their ratio are printed.
Cases: the quantizer's forward + backward at `bench_quantizer.py`'s shapes (OptVQ's Sinkhorn, cached and streaming,
and nearest-neighbour VQ), and the training step of `bench_train_step.py` (OptVQ, VQ and OT-VAE on `optvq-mnist`).

    git worktree add /tmp/optvq-main main        # or: git archive main src | tar -x -C /tmp/optvq-main
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_versions.py --baseline /tmp/optvq-main/src
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch

import optvq_hf
from optvq_hf.sinkhorn import set_block_policy

SHAPES = {  # as benchmarks/bench_quantizer.py
    "mnist": dict(batch=1024, side=8, heads=4, dim=2, codes=1024),
    "imagenet": dict(batch=8, side=16, heads=4, dim=64, codes=16384),
}


def import_baseline(src: str, name: str = "optvq_baseline"):
    """The package at `src/optvq_hf` imported as `name` (its imports are relative)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(src, "optvq_hf", "__init__.py"),
                                                  submodule_search_locations=[os.path.join(src, "optvq_hf")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def quantizer_steps(package, shape, streaming, assignment):
    torch.manual_seed(0)
    quantizer = package.OptVQQuantizer(dim=shape["dim"] * shape["heads"], codebook_size=shape["codes"],
                                       num_heads=shape["heads"], training_assignment=assignment,
                                       sinkhorn_streaming=streaming).train()
    features = torch.randn(shape["batch"], shape["dim"] * shape["heads"], shape["side"], shape["side"],
                           generator=torch.Generator().manual_seed(1), requires_grad=True)

    def step():
        output = quantizer(features)
        (output.loss + output.quantized.square().mean()).backward()

    return step


def train_steps(package, quantizer_type, batch_size):
    torch.manual_seed(0)
    overrides = {"quantizer_type": quantizer_type, "num_heads": 1} if quantizer_type == "vq" else {
        "quantizer_type": quantizer_type}
    model = package.OptVQModel(package.OptVQConfig.from_preset("optvq-mnist", **overrides)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels = torch.rand(batch_size, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def step():
        output = model(pixel_values=pixels)
        ((output.reconstruction - pixels).abs().mean() + output.quantization_loss).backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def side_by_side(name, baseline_step, current_step, repeats):
    for step in (baseline_step, current_step):  # warm-up
        step()
    times = {"baseline": [], "current": []}
    for _ in range(repeats):
        for label, step in (("baseline", baseline_step), ("current", current_step)):
            start = time.perf_counter()
            step()
            times[label].append(time.perf_counter() - start)
    base, current = statistics.median(times["baseline"]), statistics.median(times["current"])
    pairs = statistics.median(c / b for b, c in zip(times["baseline"], times["current"]))
    print(f"| {name} | {base:.3f} | {current:.3f} | {current / base:.2f}x | {pairs:.2f}x |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="the other version's `src` folder (holding optvq_hf/)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cases", nargs="+", default=["quantizer", "train"], choices=["quantizer", "train"])
    parser.add_argument("--batch_size", type=int, default=128, help="training-step batch")
    args = parser.parse_args()
    baseline = import_baseline(args.baseline)
    # the block policy: the baseline may read OMP_WAIT_POLICY itself; this checkout is told explicitly
    set_block_policy("passive" if os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE" else "active")
    print(f"baseline {args.baseline}, current {os.path.dirname(optvq_hf.__file__)}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, {args.repeats} interleaved repeats")
    print("| case | baseline median s | current median s | ratio of medians | median of pair ratios |")
    print("|---|---:|---:|---:|---:|")
    if "quantizer" in args.cases:
        variants = (("sinkhorn", "auto", "sinkhorn"), ("sinkhorn streaming", True, "sinkhorn"),
                    ("nearest", "auto", "nearest"))
        for shape_name, shape in SHAPES.items():
            for label, streaming, assignment in variants:
                side_by_side(f"quantizer {shape_name}, {label}", quantizer_steps(baseline, shape, streaming, assignment),
                             quantizer_steps(optvq_hf, shape, streaming, assignment), args.repeats)
    if "train" in args.cases:
        for quantizer_type in ("optvq", "vq", "otvae"):
            side_by_side(f"train step optvq-mnist, {quantizer_type}, batch {args.batch_size}",
                         train_steps(baseline, quantizer_type, args.batch_size),
                         train_steps(optvq_hf, quantizer_type, args.batch_size), args.repeats)


if __name__ == "__main__":
    main()
