#!/usr/bin/env python
"""Throughput levers of MNIST training (`optvq-mnist`, the Table 2 recipe), measured side by side.

Every comparison interleaves its variants (A B A B ...) in one process, or alternates whole runs, so that machine
noise hits all alike; medians are printed with their ratios. CPU seconds of this process are reported next to wall
seconds: on a shared machine they estimate what a step costs on an idle one.

    python benchmarks/bench_mnist_throughput.py step-parts          # Sinkhorn's share of a step, per batch size
    python benchmarks/bench_mnist_throughput.py argmax              # the engine's row argmax: torch vs numpy
    python benchmarks/bench_mnist_throughput.py channels-last       # NCHW vs channels_last (full step, backbone),
                                                                    # and torch.compile of the backbone
    python benchmarks/bench_mnist_throughput.py processes           # run_train: 1 process x 2 threads vs 2 x 1
    python benchmarks/bench_mnist_throughput.py cpu-per-step --batch_size 32   # CPU s/step of each rank

`--dataset_name` (default ../shared/datasets/mnist) gives real digits; `--model` a trained `optvq-mnist` folder (the
Sinkhorn engine's passes depend on how trained the features are; default: an untrained model).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as examples/run_train.py

import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from table2 import DEFAULT_DATA, launcher  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lever", choices=("step-parts", "argmax", "channels-last", "processes", "cpu-per-step"))
    parser.add_argument("--dataset_name", default=DEFAULT_DATA)
    parser.add_argument("--model", default=None, help="A trained optvq-mnist folder (default: untrained).")
    parser.add_argument("--batch_size", type=int, default=64, help="Global batch (all processes together).")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the in-process comparisons.")
    parser.add_argument("--steps", type=int, default=100, help="processes / cpu-per-step: steps per run.")
    return parser.parse_args(argv)


def load_digits(dataset_name: str, count: int) -> torch.Tensor:
    """The first `count` training digits as pixel values in [-1, 1], `(count, 1, 32, 32)`, via run_train's path."""
    import datasets
    import numpy as np

    from optvq_hf import OptVQConfig, OptVQImageProcessor
    from optvq_hf.training import ImagePreprocessor, load_image_dataset, to_pixel_values

    processor = OptVQImageProcessor.from_model_config(OptVQConfig.from_preset("optvq-mnist"))
    processor.size, processor.crop_size = {"shortest_edge": 32}, {"height": 32, "width": 32}
    preprocess = ImagePreprocessor(processor, 32, center_crop=True)
    train = load_image_dataset(dataset_name)["train"].select(range(count))
    train = train.cast_column("image", datasets.Image(decode=False))
    return to_pixel_values(torch.from_numpy(np.stack([preprocess(value) for value in train["image"]])))


def load_model(path: str | None):
    from optvq_hf import OptVQConfig, OptVQModel

    torch.manual_seed(0)
    model = OptVQModel.from_pretrained(path) if path else OptVQModel(OptVQConfig.from_preset("optvq-mnist"))
    return model.train()


class Trainer:
    """One training step of the recipe's loss (L1 + L2 + quantization), clipping and AdamW, on a private copy."""

    def __init__(self, model, channels_last: bool = False, compile_backbone: bool = False):
        from optvq_hf.training import build_optimizer, build_param_groups

        self.model = copy.deepcopy(model)
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(build_param_groups(self.model, 1e-7, 0.05))
        model = self.model
        self.backbone = lambda pixels: model.decode(model.quant_conv(model.encoder(pixels)))
        if compile_backbone:
            self.backbone = torch.compile(self.backbone)

    def step(self, pixels: torch.Tensor, quantize: bool = True):
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        model = self.model
        if quantize:
            output = model(pixels)
            reconstruction, quantization = output.reconstruction, output.quantization_loss
        else:  # the backbone alone (encoder, 1x1 convolutions, decoder)
            reconstruction, quantization = self.backbone(pixels), 0.0
        difference = reconstruction - pixels
        (difference.abs().mean() + difference.pow(2).mean() + quantization).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def interleave(variants: dict, repeats: int, warmup: int = 2) -> dict:
    """Run each callable of `variants` in turn, `repeats` times; median (wall s, CPU s) per variant."""
    for _ in range(warmup):
        for run in variants.values():
            run(0)
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for index in range(repeats):
        for name, run in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run(index)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in variants}


def report(title: str, medians: dict, per: int = 1, unit: str = "step"):
    print(title)
    base_wall, base_cpu = next(iter(medians.values()))
    for name, (wall, cpu) in medians.items():
        print(f"  {name:30s} wall {1000 * wall / per:8.2f} ms/{unit} ({wall / base_wall:.2f}x)   "
              f"CPU {1000 * cpu / per:8.2f} ms/{unit} ({cpu / base_cpu:.2f}x)")


def batches(pixels: torch.Tensor, size: int):
    count = pixels.shape[0] // size
    return lambda index: pixels[(index % count) * size:(index % count + 1) * size]


def lever_step_parts(args, pixels, model):
    import optvq_hf.quantization as quantization

    spent = [0.0]
    engine = quantization.sinkhorn_assign

    def timed(*arguments, **kwargs):
        start = time.process_time()
        result = engine(*arguments, **kwargs)
        spent[0] += time.process_time() - start
        return result

    quantization.sinkhorn_assign = timed
    try:
        for size in (32, 64, 128):
            trainer, batch = Trainer(model), batches(pixels, size)
            shares = []

            def run(index, trainer=trainer, batch=batch):
                spent[0] = 0.0
                start = time.process_time()
                trainer.step(batch(index))
                shares.append(spent[0] / max(time.process_time() - start, 1e-9))

            (wall, cpu), = interleave({"step": run}, args.repeats).values()
            print(f"batch {size:4d}: {1000 * cpu:7.1f} ms CPU/step ({1000 * cpu / size:.2f} ms/image), wall "
                  f"{1000 * wall:7.1f} ms; Sinkhorn assignment {100 * statistics.median(shares):.0f} % of the CPU time")
    finally:
        quantization.sinkhorn_assign = engine


def lever_argmax(args, pixels, model):
    import optvq_hf.sinkhorn as sinkhorn

    fast = sinkhorn._first_extreme_per_row

    def torch_argmax(block, out, largest=True):
        return torch.argmax(block, dim=1, out=out) if largest else torch.argmin(block, dim=1, out=out)

    trainers = {"torch argmax": Trainer(model), "numpy argmax (engine)": Trainer(model)}
    batch = batches(pixels, args.batch_size)

    def variant(name, function):
        def run(index):
            sinkhorn._first_extreme_per_row = function
            trainers[name].step(batch(index))
        return run

    try:
        medians = interleave({"torch argmax": variant("torch argmax", torch_argmax),
                              "numpy argmax (engine)": variant("numpy argmax (engine)", fast)}, args.repeats)
    finally:
        sinkhorn._first_extreme_per_row = fast
    report(f"training step, batch {args.batch_size}, {torch.get_num_threads()} thread(s): row argmax of the "
           f"Sinkhorn engine", medians)


def lever_channels_last(args, pixels, model):
    batch = batches(pixels, args.batch_size)
    for quantize in (True, False):
        trainers = {"NCHW": Trainer(model), "channels_last": Trainer(model, channels_last=True)}
        if not quantize:  # compiled, the quantizer would take its dense (materialized N x K) Sinkhorn path
            trainers["torch.compile"] = Trainer(model, compile_backbone=True)
            trainers["torch.compile, channels_last"] = Trainer(model, channels_last=True, compile_backbone=True)
        medians = interleave({name: (lambda index, t=trainer: t.step(batch(index), quantize=quantize))
                              for name, trainer in trainers.items()}, args.repeats)
        report(f"{'full training step' if quantize else 'backbone only (no quantizer)'}, batch {args.batch_size}, "
               f"{torch.get_num_threads()} thread(s)", medians)


def _train_command(args, processes: int, steps: int, output_dir: str) -> list[str]:
    script = [os.path.join(REPO, "examples", "run_train.py")]
    return launcher(processes) + [os.path.abspath(__file__), "--_run_train"] + script + [
        "--model_config_name_or_path", "optvq-mnist", "--dataset_name", args.dataset_name,
        "--validation_split", "test", "--max_eval_samples", "256", "--skip_final_eval", "--report_to", "none",
        "--logging_steps", "50", "--seed", "0", "--learning_rate", "7.2e-5",
        "--train_batch_size", str(args.batch_size // processes), "--max_train_steps", str(steps),
        "--output_dir", output_dir]


def _run(command: list[str], output_dir: str) -> list[dict]:
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks = sorted(f for f in os.listdir(output_dir) if f.startswith("cpu-rank"))
    return [json.load(open(os.path.join(output_dir, name))) for name in ranks]


def lever_processes(args):
    """Whole run_train runs, alternated: wall seconds per step of 1 process x 2 threads and 2 processes x 1."""
    results = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(max(1, args.repeats // 6)):
            for processes in (1, 2):
                out = os.path.join(folder, f"p{processes}-{repeat}")
                ranks = _run(_train_command(args, processes, args.steps, out), out)
                results[processes].append(ranks[0]["seconds_per_step"])
                print(f"  {processes} process(es): {ranks[0]['seconds_per_step']:.4f} s/step (load "
                      f"{os.getloadavg()[0]:.1f})", flush=True)
    one, two = statistics.median(results[1]), statistics.median(results[2])
    print(f"batch {args.batch_size}: 1 process x 2 threads {one:.4f} s/step, 2 processes x 1 thread {two:.4f} s/step "
          f"(ratio {two / one:.2f})")


def lever_cpu_per_step(args):
    """CPU seconds per step of each rank (2 processes x 1 thread): runs of `steps` and `5 x steps` steps, differenced
    (start-up, data loading and codebook initialization cancel). On a shared machine, an estimate of the idle s/step."""
    per_rank = {}
    with tempfile.TemporaryDirectory() as folder:
        for steps in (args.steps, 5 * args.steps):
            out = os.path.join(folder, f"s{steps}")
            for rank in _run(_train_command(args, 2, steps, out), out):
                per_rank.setdefault(rank["rank"], {})[steps] = rank
    for rank, runs in sorted(per_rank.items()):
        short, long = runs[args.steps], runs[5 * args.steps]
        cpu = (long["cpu_s"] - short["cpu_s"]) / (4 * args.steps)
        wall = (long["train_time_s"] - short["train_time_s"]) / (4 * args.steps)
        print(f"batch {args.batch_size} (2 x {args.batch_size // 2}), rank {rank}: {cpu:.4f} CPU s/step, "
              f"{wall:.4f} wall s/step (load {os.getloadavg()[0]:.1f}); "
              f"{1000 * cpu / args.batch_size * 2:.3f} ms CPU per image of this rank")


def _run_train_with_cpu_report(argv):
    """Run run_train.main(argv) and write this rank's CPU seconds next to its metrics."""
    sys.path.insert(0, os.path.dirname(argv[0]))
    import run_train

    start = time.process_time()
    metrics = run_train.main(argv[1:])
    output_dir = argv[argv.index("--output_dir") + 1]
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(output_dir, f"cpu-rank{rank}.json"), "w") as handle:
        json.dump({"rank": rank, "cpu_s": time.process_time() - start, "train_time_s": metrics["train_time_s"],
                   "seconds_per_step": metrics["seconds_per_step"]}, handle)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_run_train":
        return _run_train_with_cpu_report(argv[1:])
    args = parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}", flush=True)
    if args.lever == "processes":
        return lever_processes(args)
    if args.lever == "cpu-per-step":
        return lever_cpu_per_step(args)
    torch.set_num_threads(args.threads)
    pixels = load_digits(args.dataset_name, 1024)
    model = load_model(args.model)
    {"step-parts": lever_step_parts, "argmax": lever_argmax, "channels-last": lever_channels_last}[args.lever](
        args, pixels, model)


if __name__ == "__main__":
    main()
