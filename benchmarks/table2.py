#!/usr/bin/env python
"""Reproduce the OptVQ paper's Table 2 (MNIST: VQ-VAE vs OptVQ), plus OT-VAE, with our own scripts.

For each quantizer (OptVQ, vanilla VQ, OT-VAE) this trains the same network (the paper's Table 4 CNN, 1024 codes of
dimension 8 in total) with the same budget and recipe using `examples/run_train.py`, evaluates it on the MNIST test
split with `examples/run_eval.py`, and writes:

* `OUT/table2.json` and `OUT/table2.md`: PSNR, SSIM, code usage, perplexity, dead codes, train time;
* `OUT/table2_curves.png`: test PSNR and code usage against wall time (from the TensorBoard scalars of run_train:
  its periodic evaluations, and run_eval's score at the end of training);
* for OptVQ: how often nearest-neighbour and Sinkhorn inference tokens agree and the PSNR of each;
* the machine (CPU, cores, torch) and its load average, sampled while the commands ran;
* each run's verdict (run_train's): healthy, COLLAPSED, or DIVERGED at a step. A diverged run ends with exit status 4
  and keeps the finite weights of the step before; those are scored when run_train could evaluate them, else its
  last periodic evaluation stands in (or no score at all), and the table says so;
* with `--docs`, the same table, the plot (`docs/table2_curves*.png`) and the command line into `docs/benchmarks.md`
  (one section per budget).

Budgets:

* `--budget short` (default): 4 "epochs" of 5,120 training digits each at batch 128 (160 steps), scored on 1,000
  test digits; under 15 minutes on 2 busy CPU cores.
* `--budget paper`: the recipe of docs/training.md, "Reproducing Table 2": the paper's 34.28 dB with every code in
  use, in an hour on 2 CPU cores (two processes of one thread each), scored on all 10,000 test digits.
* `--budget full`: the paper's own setting, 100 epochs over the 60,000 training digits at batch 1024, scored on the
  10,000 test digits (hours on CPU; meant for a GPU).

    nice python benchmarks/table2.py --dataset_name ../shared/datasets/mnist --output_dir table2-out --docs
    python benchmarks/table2.py --budget paper --output_dir table2-paper --docs   # timed: not `nice`d
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ../shared/datasets/mnist next to the checkout (or next to the worktrees' folder), else the Hub copy
DEFAULT_DATA = next((path for path in (os.path.join(REPO, "..", "shared", "datasets", "mnist"),
                                       os.path.join(REPO, "..", "..", "shared", "datasets", "mnist"))
                     if os.path.isdir(path)), "ylecun/mnist")
QUANTIZERS = {
    # name: (preset, label)
    "optvq": ("optvq-mnist", "OptVQ"),
    "vq": ("vq-mnist", "VQ-VAE"),
    "otvae": ("otvae-mnist", "OT-VAE"),
}
# The recipe of docs/training.md, "Reproducing Table 2" (tests/test_table2.py checks that both say the same).
PAPER_RECIPE = [
    "--train_batch_size", "16", "--max_train_steps", "12000", "--learning_rate", "2.88e-4",
    "--codebook_init", "kmeans", "--validation_steps", "1500",
]
BUDGETS = {
    "short": dict(train_batch_size=128, max_train_samples=5120, num_train_epochs=4, max_eval_samples=1000,
                  num_processes=1, recipe=[]),
    "paper": dict(train_batch_size=None, max_train_samples=None, num_train_epochs=None, max_eval_samples=None,
                  validation_eval_samples=2000, num_processes=2, recipe=PAPER_RECIPE),
    "full": dict(train_batch_size=1024, max_train_samples=None, num_train_epochs=100, max_eval_samples=None,
                 num_processes=1, recipe=[]),
}
PAPER = {"optvq": (34.28, 1.0), "vq": (9.02, 0.002)}
# The original code at (about) the short budget, same recipe (run_train's defaults are the original's), batch 128,
# nearest-neighbour tokens on 2,000 test digits: ../shared/reference/original-optvq.md.
ORIGINAL_CODE = {"short": {"optvq": "12.2 / 61 % (150 steps)",
                           "vq": "one code (0.1 %) at 150 steps; 12.5 dB at 600",
                           "otvae": "n/a (not in the release)"}}
SECTION_TITLES = {
    "short": "## Table 2 reproduction (MNIST: OptVQ vs VQ-VAE vs OT-VAE)",
    "paper": "## Table 2 at the paper's quality in an hour (`--budget paper`)",
    "full": "## Table 2 at the paper's own budget (`--budget full`)",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_name", default=DEFAULT_DATA,
                        help="MNIST: a local folder of parquet files or the Hub id ylecun/mnist (default: "
                             "../shared/datasets/mnist if present).")
    parser.add_argument("--output_dir", default=os.path.join(REPO, "table2-out"))
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="short")
    parser.add_argument("--quantizers", default=None,
                        help=f"Subset of {','.join(QUANTIZERS)} (default: all three; optvq,vq for --budget paper).")
    parser.add_argument("--num_processes", type=int, default=None,
                        help="Training processes (torchrun on one machine); default: the budget's (2 for paper).")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Override the budget's epoch size.")
    parser.add_argument("--num_train_epochs", type=int, default=None, help="Override the budget's epochs.")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Override the budget's test images.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs", action="store_true", help="Write the results into docs/benchmarks.md.")
    parser.add_argument("--docs_dir", default=os.path.join(REPO, "docs"), help="Where benchmarks.md lives.")
    parser.add_argument("--skip_existing", action="store_true",
                        help="Reuse a quantizer's finished run (metrics.json and results.json present in --output_dir).")
    parser.add_argument("--train_args", default="",
                        help="Extra arguments for run_train.py (one string), after the budget's recipe.")
    args = parser.parse_args(argv)
    default_quantizers = "optvq,vq" if args.budget == "paper" else ",".join(QUANTIZERS)
    args.quantizer_list = [q.strip() for q in (args.quantizers or default_quantizers).split(",") if q.strip()]
    unknown = [q for q in args.quantizer_list if q not in QUANTIZERS]
    if unknown or not args.quantizer_list:
        parser.error(f"--quantizers must be a subset of {list(QUANTIZERS)}, got {args.quantizers!r}.")
    settings = dict(BUDGETS[args.budget])
    for key in ("max_train_samples", "num_train_epochs", "max_eval_samples", "num_processes"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if settings["num_processes"] < 1:
        parser.error(f"--num_processes must be >= 1, got {settings['num_processes']}.")
    args.settings = settings
    return args


class LoadSampler:
    """Samples the 1-minute load average (`/proc/loadavg`) every `interval` seconds in a background thread."""

    def __init__(self, interval: float = 30.0):
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> float | None:
        try:
            with open("/proc/loadavg") as handle:
                return float(handle.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _run(self):
        while True:
            value = self.read()
            if value is not None:
                self.samples.append((time.time(), value))
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        values = [value for _, value in self.samples]
        if not values:
            return {"samples": 0}
        return {"samples": len(values), "min": min(values), "median": statistics.median(values), "max": max(values)}


def machine_description() -> dict:
    """CPU model, cores and the torch build (for the docs: where the numbers were measured)."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": cores, "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.is_available()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list[str], log_path: str, accept=lambda returncode: returncode == 0):
    """Run `command` (output to `log_path`); its wall time in seconds. Raises unless `accept(returncode)`."""
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        completed = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if not accept(completed.returncode):
        with open(log_path) as log:
            tail = log.read()[-3000:]
        raise RuntimeError(f"Command failed ({completed.returncode}), see {log_path}:\n{tail}")
    return time.perf_counter() - start


def failed_with_a_verdict(train_dir: str) -> bool:
    """Whether run_train ended with a verdict of its own (a diverged run exits with status 4; torchrun then with 1),
    rather than a crash: its metrics.json records the divergence."""
    path = os.path.join(train_dir, "metrics.json")
    if not os.path.isfile(path):
        return False
    with open(path) as handle:
        return bool(json.load(handle).get("diverged"))


def verdict(train_metrics: dict) -> str:
    """run_train's verdict on a run, as the table shows it."""
    words = [f"DIVERGED at step {train_metrics['diverged_at_step']}"] if train_metrics.get("diverged") else []
    words += ["COLLAPSED"] if train_metrics.get("collapsed") else []
    return ", ".join(words) or "healthy"


def scored(train_metrics: dict) -> bool:
    """Whether the model a run saved can be scored by run_eval: always for a finished run; for a diverged one when
    run_train could evaluate the finite weights it kept (their latents within what the quantizer accepts)."""
    if not train_metrics.get("diverged"):
        return True
    return bool(train_metrics.get("final_model_saved")) and "psnr" in train_metrics


def launcher(num_processes: int) -> list[str]:
    """`python` for one process, `python -m torch.distributed.run --nproc_per_node N` (free port) for several."""
    if num_processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]


def steps_per_epoch(settings: dict) -> int | None:
    if settings.get("train_batch_size") is None:
        return None
    return -(-(settings["max_train_samples"] or 60000) // (settings["train_batch_size"] * settings["num_processes"]))


def train_command(args, name: str, output_dir: str) -> list[str]:
    settings = args.settings
    command = launcher(settings["num_processes"]) + [
        os.path.join(REPO, "examples", "run_train.py"),
        "--model_config_name_or_path", QUANTIZERS[name][0],
        "--dataset_name", args.dataset_name, "--validation_split", "test",
        "--report_to", "tensorboard", "--seed", str(args.seed), "--output_dir", output_dir]
    if settings.get("train_batch_size") is not None:
        command += ["--train_batch_size", str(settings["train_batch_size"]),
                    "--num_train_epochs", str(settings["num_train_epochs"]),
                    "--validation_steps", str(steps_per_epoch(settings))]
    if settings["max_train_samples"]:
        command += ["--max_train_samples", str(settings["max_train_samples"])]
    eval_samples = settings.get("validation_eval_samples") or settings["max_eval_samples"]
    if eval_samples:
        command += ["--max_eval_samples", str(eval_samples)]
    return command + list(settings["recipe"]) + (args.train_args.split() if args.train_args else [])


def eval_command(args, name: str, model_dir: str, output_dir: str) -> list[str]:
    command = [sys.executable, os.path.join(REPO, "examples", "run_eval.py"), "--model", model_dir,
               "--dataset_name", args.dataset_name, "--split", "test", "--output_dir", output_dir,
               "--batch_size", "256", "--metrics", "psnr,ssim,usage"]
    if args.settings["max_eval_samples"]:
        command += ["--max_eval_samples", str(args.settings["max_eval_samples"])]
    if name == "optvq":
        command.append("--compare_assignments")
    return command


EVAL_SCALARS = (("eval/psnr", "psnr"), ("eval/codebook_usage", "codebook_usage"), ("eval/perplexity", "perplexity"))
TRAIN_SCALARS = (("train/codebook_usage", "codebook_usage"),)


def read_curves(train_dir: str, start_time: float | None = None, scalars=EVAL_SCALARS) -> list[dict]:
    """Test PSNR and code usage of run_train's periodic evaluations (TensorBoard `eval/psnr`,
    `eval/codebook_usage`), each with its step and its wall time in seconds after `start_time` (default: the
    first event of the run). `scalars=TRAIN_SCALARS`: the code usage of the training batches of each logging window
    instead (`train/codebook_usage`)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, dict] = {}
    first = None
    for path in glob.glob(os.path.join(train_dir, "**", "events.out.tfevents.*"), recursive=True):
        accumulator = EventAccumulator(path, size_guidance={"scalars": 0})
        accumulator.Reload()
        tags = accumulator.Tags().get("scalars", [])
        for tag in tags:
            for event in accumulator.Scalars(tag):
                first = event.wall_time if first is None else min(first, event.wall_time)
        for tag, key in scalars:
            if tag in tags:
                for event in accumulator.Scalars(tag):
                    point = points.setdefault(event.step, {"step": event.step})
                    point[key] = event.value
                    point["wall_time"] = event.wall_time
    origin = start_time if start_time is not None else first
    curve = [dict(point, seconds=point["wall_time"] - origin) for _, point in sorted(points.items())]
    return [point for point in curve if scalars[0][1] in point]


def plot_curves(curves: dict, path: str, target: float | None = None, training_usage: dict | None = None):
    """Test PSNR and code usage against wall time (`curves`: name -> points of [`read_curves`]); with
    `training_usage` (name -> points of `read_curves(..., scalars=TRAIN_SCALARS)`), the training batches' code usage
    as a thin line of the same colour in the usage panel (a run stopped before its first evaluation has a curve
    there too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for index, name in enumerate(curves):
        curve, color = curves[name], f"C{index}"
        training = (training_usage or {}).get(name) or []
        if training:
            axes[1].plot([p["seconds"] / 60 for p in training], [100 * p["codebook_usage"] for p in training],
                         color=color, linewidth=0.8, alpha=0.6, label=f"{QUANTIZERS[name][1]} (training batches)")
        if not curve:
            continue
        minutes = [p["seconds"] / 60 for p in curve]
        axes[0].plot(minutes, [p["psnr"] for p in curve], marker="o", color=color, label=QUANTIZERS[name][1])
        axes[1].plot(minutes, [100 * p.get("codebook_usage", float("nan")) for p in curve], marker="o", color=color,
                     label=QUANTIZERS[name][1])
    if target is not None:
        axes[0].axhline(target, color="gray", linestyle="--", linewidth=1, label=f"paper OptVQ ({target} dB)")
    axes[0].set(xlabel="wall time (min)", ylabel="test PSNR (dB)", title="MNIST reconstruction")
    axes[1].set(xlabel="wall time (min)", ylabel="code usage (%)", title="codebook usage (test; lines: training)",
                ylim=(-2, 102))
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_table(results: dict, budget: str | None = None) -> str:
    original = ORIGINAL_CODE.get(budget)
    lines = ["| quantizer | verdict | test PSNR (dB) | SSIM | code usage | perplexity | dead codes | steps | train time | "
             "command wall time | paper PSNR / usage |" + (" original code, same recipe: PSNR / usage |" if original
                                                           else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if original else "")]
    for name, r in results.items():
        paper = PAPER.get(name)
        paper_text = f"{paper[0]:.2f} / {100 * paper[1]:.2f} %" if paper else "n/a"
        if "psnr" in r:
            scores = (f"{r['psnr']:.2f} | {r['ssim']:.3f} | {100 * r['codebook_usage']:.1f} % | {r['perplexity']:.1f} "
                      f"| {r['dead_codes']}")
        else:  # a diverged run whose weights could not be scored: its last periodic evaluation, if any
            last = r.get("last_eval")
            scores = (f"none (last evaluation, step {last['step']}: {last['psnr']:.2f}) | | "
                      f"{100 * last['codebook_usage']:.1f} % (step {last['step']}) | | " if last else "none | | | | ")
        lines.append(
            f"| {QUANTIZERS[name][1]} (`{QUANTIZERS[name][0]}`) | {r.get('verdict', 'healthy')} | {scores} | "
            f"{r['global_step']} | "
            f"{r['train_time_s']:.0f} s ({r['seconds_per_step']:.3f} s/step) | "
            f"{r.get('train_wall_s', float('nan')) / 60:.1f} min | {paper_text} |"
            + (f" {original.get(name, 'n/a')} |" if original else ""))
    return "\n".join(lines)


def _command_text(command: list[str]) -> str:
    """A command as a user would type it (repository-relative paths, `python` for this interpreter, the default
    MNIST folder as the docs spell it)."""
    words = []
    for word in command:
        if word == sys.executable:
            word = "python"
        elif word == DEFAULT_DATA and os.path.isdir(word):
            word = "../shared/datasets/mnist"
        elif os.path.isabs(word) and word.startswith(REPO + os.sep):
            word = os.path.relpath(word, REPO)
        words.append(word)
    text = " ".join(words)
    for flag in ("--master_port",):  # a free port picked at run time
        if flag in words:
            port = words[words.index(flag) + 1]
            text = text.replace(f"{flag} {port}", f"{flag} PORT")
    return text


GENERATED_END = "<!-- end of the generated part: notes below it are kept when the section is regenerated -->"


def write_docs(results: dict, args, table: str, command: str, plot_name: str, machine: dict, commands: dict):
    path = os.path.join(args.docs_dir, "benchmarks.md")
    with open(path) as handle:
        text = handle.read()
    settings = args.settings
    title = SECTION_TITLES[args.budget]
    lines = [title, ""]
    if args.budget == "paper":
        lines += [
            "`benchmarks/table2.py --budget paper` trains OptVQ and the VQ baseline on the paper's network "
            "(`*-mnist` presets: the Table 4 CNN, 1024 codes, `embed_dim` 8; OptVQ with 4 heads, VQ with 1) with "
            "the recipe of [docs/training.md, \"Reproducing Table 2\"](training.md#reproducing-table-2), the same "
            "command for both, then scores each on all 10,000 MNIST test digits with `examples/run_eval.py` (mean "
            "per-image PSNR over [0, 1] pixels in the `rgb` score convention, which on grayscale MNIST equals the "
            "paper's Y-channel one; reconstructions clamped, nearest-neighbour tokens). The verdict column is "
            "run_train's (docs/training.md, \"Is my run healthy?\"): a run that DIVERGED was stopped at that step "
            "and its row scores the finite weights it kept (or shows its last evaluation when they cannot be "
            "scored); COLLAPSED means its reconstructions barely depend on the input. Command:",
        ]
    else:
        lines += [
            "`benchmarks/table2.py` trains the three quantizers on the same network (`*-mnist` presets: the paper's "
            "Table 4 CNN, 1024 codes, `embed_dim` 8; OptVQ and OT-VAE with 4 heads, VQ with 1 as in the original "
            "configs) with `examples/run_train.py` and the same budget and recipe (run_train's defaults: L1 + L2 + "
            "quantization loss, AdamW, OneCycle), then scores each on the MNIST test split with "
            "`examples/run_eval.py` (mean per-image PSNR over [0, 1] pixels in the `rgb` score convention, which on "
            "grayscale MNIST equals the paper's Y-channel one; nearest-neighbour tokens).",
            "",
            f"Budget `{args.budget}`: batch {settings['train_batch_size']}, {settings['num_train_epochs']} epochs of "
            f"{settings['max_train_samples'] or 60000} training digits, "
            f"{settings['max_eval_samples'] or 10000} test digits. Command:",
        ]
    lines += ["", "```bash", command, "```", "", "The training commands it ran (the OptVQ one is the recipe):", "",
              "```bash"] + [commands[name] for name in results] + ["```", "", table, ""]
    optvq = results.get("optvq")
    if optvq and "token_agreement" in optvq:
        lines += [
            f"Inference tokens of the trained OptVQ model (test images in batches of {optvq['sinkhorn_batch_size']}): "
            f"nearest-neighbour and Sinkhorn assignment agree on {100 * optvq['token_agreement']:.1f} % of the "
            f"tokens; PSNR {optvq['psnr_nearest']:.2f} dB with nearest tokens, {optvq['psnr_sinkhorn']:.2f} dB with "
            f"Sinkhorn tokens.",
            "",
        ]
    curve_text = ("periodic evaluations of run_train on the first "
                  f"{settings.get('validation_eval_samples') or settings['max_eval_samples'] or 10000} test digits, "
                  "and run_eval's score on the whole split at the end of training (markers); the thin lines are the "
                  "code usage of the training batches of each logging window")
    lines += [f"![test PSNR and code usage against wall time]({plot_name})", "",
              f"Curves: {curve_text}; time counts from the launch of the training command (start-up, data "
              f"loading and codebook initialization included).", ""]
    load_lines = []
    for name, r in results.items():
        load = r.get("load") or {}
        if load.get("samples"):
            load_lines.append(f"{QUANTIZERS[name][1]} {load['min']:.2f} / {load['median']:.2f} / {load['max']:.2f} "
                              f"({load['samples']} samples)")
    lines += [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}"
        f"{', CUDA' if machine['cuda'] else ', no GPU'}; {settings['num_processes']} training process(es). Load "
        "average (1 min; min / median / max while each training ran): "
        + ("; ".join(load_lines) if load_lines else "not sampled") + ".",
        "",
        GENERATED_END,
        "",
    ]
    section = "\n".join(lines)
    start = text.find(title)
    if start >= 0:
        end = text.find("\n## ", start + 1)
        old = text[start:end + 1] if end >= 0 else text[start:]
        kept = old.split(GENERATED_END, 1)[1].lstrip("\n") if GENERATED_END in old else ""
        text = text[:start] + section + ("\n" + kept if kept.strip() else "") + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as handle:
        handle.write(text)
    print(f"updated {path}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    settings = args.settings
    machine = machine_description()
    results, curves, training_usage, commands = {}, {}, {}, {}
    for name in args.quantizer_list:
        train_dir = os.path.join(args.output_dir, name)
        eval_dir = os.path.join(args.output_dir, f"{name}-eval")
        timing_path = os.path.join(args.output_dir, f"{name}-timing.json")
        command = train_command(args, name, train_dir)
        commands[name] = _command_text(command)
        done = all(os.path.isfile(p) for p in (os.path.join(train_dir, "metrics.json"), timing_path))
        if args.skip_existing and done:
            print(f"{name}: reusing {train_dir} and {eval_dir}", flush=True)
        else:
            launch = time.time()
            with LoadSampler() as sampler:
                train_wall = _run(command, os.path.join(args.output_dir, f"{name}-train.log"),
                                  accept=lambda code: code == 0 or failed_with_a_verdict(train_dir))
            timing = {"launch_time": launch, "train_wall_s": train_wall, "load": sampler.summary()}
            with open(os.path.join(train_dir, "metrics.json")) as handle:
                if scored(json.load(handle)):
                    timing["eval_seconds"] = _run(eval_command(args, name, train_dir, eval_dir),
                                                  os.path.join(args.output_dir, f"{name}-eval.log"))
            with open(timing_path, "w") as handle:
                json.dump(timing, handle, indent=2)
        with open(timing_path) as handle:
            timing = json.load(handle)
        with open(os.path.join(train_dir, "metrics.json")) as handle:
            train_metrics = json.load(handle)
        results[name] = {**timing, **{k: train_metrics[k] for k in ("global_step", "train_time_s", "seconds_per_step")},
                         "verdict": verdict(train_metrics), "last_eval": train_metrics.get("last_eval")}
        if "eval_seconds" in timing:
            with open(os.path.join(eval_dir, "results.json")) as handle:
                results[name].update(json.load(handle))
        curve = read_curves(train_dir, timing["launch_time"])
        if "psnr" in results[name]:
            curve.append({"step": train_metrics["global_step"], "seconds": timing["train_wall_s"],
                          "psnr": results[name]["psnr"], "codebook_usage": results[name]["codebook_usage"],
                          "perplexity": results[name]["perplexity"], "final": True})
            print(f"{name}: {results[name]['verdict']}, PSNR {results[name]['psnr']:.2f} dB, usage "
                  f"{100 * results[name]['codebook_usage']:.1f} %", flush=True)
        else:
            print(f"{name}: {results[name]['verdict']}, no score (its weights could not be evaluated)", flush=True)
        curves[name] = curve
        training_usage[name] = read_curves(train_dir, timing["launch_time"], scalars=TRAIN_SCALARS)
    table = render_table(results, args.budget)
    plot_path = os.path.join(args.output_dir, "table2_curves.png")
    plot_curves(curves, plot_path, target=PAPER["optvq"][0] if args.budget == "paper" else None,
                training_usage=training_usage)
    with open(os.path.join(args.output_dir, "table2.json"), "w") as handle:
        json.dump({"budget": args.budget, "settings": settings, "machine": machine, "commands": commands,
                   "results": results, "curves": curves, "training_usage": training_usage}, handle, indent=2)
    with open(os.path.join(args.output_dir, "table2.md"), "w") as handle:
        handle.write(table + "\n")
    print(table)
    if args.docs:
        import shutil

        plot_name = "table2_curves.png" if args.budget == "short" else f"table2_curves_{args.budget}.png"
        shutil.copyfile(plot_path, os.path.join(args.docs_dir, plot_name))
        # the paper budget is a timed run (wall time against the hour), so not `nice`d
        command = ("python" if args.budget == "paper" else "nice python") + " benchmarks/table2.py " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:]) if a != "--skip_existing")
        write_docs(results, args, table, command, plot_name, machine, commands)
    return results


if __name__ == "__main__":
    main()
