"""Time and peak memory of one quantizer forward+backward: OptVQ's Sinkhorn (the published algorithm, ours cached and
streaming) and nearest-neighbour VQ (minimal, ours, vector-quantize-pytorch).

Each variant runs in its own process (so peak-memory numbers do not mix); the parent prints a table with ratios.

    python benchmarks/bench_quantizer.py                          # MNIST and ImageNet shapes, all variants
    python benchmarks/bench_quantizer.py --shapes imagenet --repeats 5
    python benchmarks/bench_quantizer.py --shapes large --variants ours ours_nearest   # K = 100,000

Shapes (N = batch x positions x heads rows of dimension d, K codes):
    mnist:    B=1024, 8x8 positions, 4 heads, d=2   -> N = 262,144, K = 1,024
    imagenet: B=8, 16x16 positions, 4 heads, d=64   -> N = 8,192,   K = 16,384
    large:    B=8, 16x16 positions, 4 heads, d=64   -> N = 8,192,   K = 100,000

Time: median over `--repeats` timed steps after one warm-up step. Peak memory: the process's peak RSS
(`ru_maxrss`) minus its RSS just before the first step (inputs and parameters already allocated). On CUDA
(`--device cuda`), `torch.cuda.max_memory_allocated` growth instead, and `--autocast`/`--compile` are available.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {
    "mnist": dict(batch=1024, side=8, heads=4, dim=2, codes=1024),
    "imagenet": dict(batch=8, side=16, heads=4, dim=64, codes=16384),
    "large": dict(batch=8, side=16, heads=4, dim=64, codes=100_000),
}
VARIANTS = ["published", "ours", "ours_streaming", "minimal_nearest", "ours_nearest", "vector_quantize_pytorch"]
DESCRIPTIONS = {
    "published": "published algorithm, dense (cdist, exp plan, in-place normalizations)",
    "ours": "OptVQQuantizer, Sinkhorn, streaming='auto'",
    "ours_streaming": "OptVQQuantizer, Sinkhorn, streaming=True",
    "minimal_nearest": "minimal nearest-neighbour VQ (one matmul + argmin)",
    "ours_nearest": "VectorQuantizer (ours, chunked nearest)",
    "vector_quantize_pytorch": "vector-quantize-pytorch VectorQuantize (defaults)",
}


# ----------------------------------------------------------------------------------------------------------------
# Variants: each returns (parameters, step) where step(features) runs forward + backward
# ----------------------------------------------------------------------------------------------------------------
def _published_sinkhorn(cost, epsilon, iters):
    """The published recursion as written in the paper's Algorithm 1: dense, exponential domain, float32."""
    plan = torch.exp(-epsilon * cost).t()  # (K, N)
    codes, rows = plan.shape
    plan /= plan.sum() + 1e-8
    for _ in range(iters):
        plan /= plan.sum(dim=1, keepdim=True) + 1e-8
        plan /= codes
        plan /= plan.sum(dim=0, keepdim=True) + 1e-8
        plan /= rows
    return plan.t()


def _make_published(shape, device):
    dim, codes = shape["dim"], shape["codes"]
    table = torch.nn.Embedding(codes, dim).to(device)
    projection = torch.nn.Linear(dim, dim).to(device)

    def step(features):
        rows = features.permute(0, 2, 3, 1).reshape(-1, dim)
        codebook = projection(table.weight)
        distances = torch.cdist(rows, codebook)  # kept for autograd, as in the original
        with torch.no_grad():
            cost = (distances - distances.mean()) / (distances.std() + 1e-6)
            cost = cost - cost.min()
            ids = _published_sinkhorn(cost, 10.0, 5).argmax(dim=-1)
        chosen = codebook[ids]
        loss = F.mse_loss(rows, chosen.detach()) + 0.25 * F.mse_loss(chosen, rows.detach())
        quantized = rows + (chosen - rows).detach()
        (loss + quantized.square().mean()).backward()

    return list(table.parameters()) + list(projection.parameters()), step


def _make_ours(shape, device, streaming="auto", assignment="sinkhorn"):
    from optvq_hf import OptVQQuantizer

    quantizer = OptVQQuantizer(
        dim=shape["dim"] * shape["heads"],
        codebook_size=shape["codes"],
        num_heads=shape["heads"],
        training_assignment=assignment,
        sinkhorn_streaming=streaming,
    ).to(device)
    quantizer.train()

    def step(features):
        output = quantizer(features)
        (output.loss + output.quantized.square().mean()).backward()

    return list(quantizer.parameters()), step


def _make_minimal(shape, device):
    dim, codes = shape["dim"], shape["codes"]
    codebook = torch.nn.Parameter(torch.randn(codes, dim, device=device))

    def step(features):
        rows = features.permute(0, 2, 3, 1).reshape(-1, dim)
        with torch.no_grad():
            ids = torch.addmm(codebook.square().sum(1), rows, codebook.t(), alpha=-2.0).argmin(dim=1)
        chosen = codebook[ids]
        loss = F.mse_loss(rows, chosen.detach()) + 0.25 * F.mse_loss(chosen, rows.detach())
        quantized = rows + (chosen - rows).detach()
        (loss + quantized.square().mean()).backward()

    return [codebook], step


def _make_vector_quantize(shape, device):
    from vector_quantize_pytorch import VectorQuantize

    dim = shape["dim"]
    quantizer = VectorQuantize(dim=dim, codebook_size=shape["codes"]).to(device)
    quantizer.train()

    def step(features):
        rows = features.permute(0, 2, 3, 1).reshape(1, -1, dim)  # the same N rows of dimension d
        quantized, _, loss = quantizer(rows)
        (loss.sum() + quantized.square().mean()).backward()

    return list(quantizer.parameters()), step


def _build(variant, shape, device):
    if variant == "published":
        return _make_published(shape, device)
    if variant == "ours":
        return _make_ours(shape, device)
    if variant == "ours_streaming":
        return _make_ours(shape, device, streaming=True)
    if variant == "ours_nearest":
        return _make_ours(shape, device, assignment="nearest")
    if variant == "minimal_nearest":
        return _make_minimal(shape, device)
    if variant == "vector_quantize_pytorch":
        return _make_vector_quantize(shape, device)
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


# ----------------------------------------------------------------------------------------------------------------
# One variant, in this process
# ----------------------------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(variant, shape_name, repeats, device, use_autocast, use_compile):
    torch.manual_seed(0)
    shape = SHAPES[shape_name]
    parameters, step = _build(variant, shape, device)
    if use_compile:
        step = torch.compile(step)
    features = torch.randn(
        shape["batch"], shape["dim"] * shape["heads"], shape["side"], shape["side"], device=device, requires_grad=True
    )
    context = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if use_autocast
        else torch.autocast(device_type=device.type, enabled=False)
    )

    def timed():
        for parameter in parameters:
            parameter.grad = None
        features.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with context:
            step(features)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = [timed() for _ in range(repeats + 1)][1:]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"variant": variant, "shape": shape_name, "median_s": statistics.median(times), "times_s": times,
            "peak_growth_bytes": peak}


# ----------------------------------------------------------------------------------------------------------------
# Parent: one subprocess per variant, then the table
# ----------------------------------------------------------------------------------------------------------------
def _table(results, shape_name):
    rows = [r for r in results if r["shape"] == shape_name and "error" not in r]
    by_name = {r["variant"]: r for r in rows}
    shape = SHAPES[shape_name]
    n = shape["batch"] * shape["side"] ** 2 * shape["heads"]
    lines = [
        f"### {shape_name}: N = {n:,}, K = {shape['codes']:,}, d = {shape['dim']}",
        "",
        "| variant | median s | peak growth GB | time / published | memory / published | time / minimal NN |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def ratio(value, key, reference):
        base = by_name.get(reference)
        return f"{value / base[key]:.2f}x" if base and base[key] > 0 else "-"

    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['median_s']:.3f} | {r['peak_growth_bytes'] / 1e9:.3f} | "
            f"{ratio(r['median_s'], 'median_s', 'published')} | "
            f"{ratio(r['peak_growth_bytes'], 'peak_growth_bytes', 'published')} | "
            f"{ratio(r['median_s'], 'median_s', 'minimal_nearest')} |"
        )
    for r in results:
        if r["shape"] == shape_name and "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | | |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["mnist", "imagenet"], choices=sorted(SHAPES))
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast around the step")
    parser.add_argument("--compile", action="store_true", help="torch.compile the step")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every variant")
    parser.add_argument("--json", default=None, help="also write all results to this file")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        from optvq_hf.sinkhorn import set_block_policy

        # as examples/run_train.py: the engine's CPU blocks follow how OpenMP threads wait
        passive = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
        set_block_policy("passive" if passive else "active")
        result = run_one(args.one[0], args.one[1], args.repeats, torch.device(args.device), args.autocast, args.compile)
        print("RESULT " + json.dumps(result))
        return

    print(f"torch {torch.__version__}, device {args.device}, threads {args.threads or torch.get_num_threads()}, "
          f"autocast {args.autocast}, compile {args.compile}, repeats {args.repeats}")
    results = []
    for shape_name in args.shapes:
        for variant in args.variants:
            command = [sys.executable, __file__, "--one", variant, shape_name, "--repeats", str(args.repeats),
                       "--device", args.device]
            command += ["--autocast"] * args.autocast + ["--compile"] * args.compile
            command += ["--threads", str(args.threads)] if args.threads else []
            completed = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
            if completed.returncode or not lines:
                error = (completed.stderr.strip().splitlines() or ["no output"])[-1]
                results.append({"variant": variant, "shape": shape_name, "error": error[:200]})
            else:
                results.append(json.loads(lines[-1][len("RESULT "):]))
            print(f"  {shape_name:9s} {variant:24s} {results[-1].get('median_s', float('nan')):8.3f} s", flush=True)
    print()
    for shape_name in args.shapes:
        print(_table(results, shape_name))
        print()
    for variant in args.variants:
        print(f"- {variant}: {DESCRIPTIONS[variant]}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
