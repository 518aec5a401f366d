"""examples/run_train.py with 2 real CPU processes (accelerate launch, gloo): DDP training on a global batch equals
one process on the same global batch, evaluation is reduced across ranks, only the main process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from training_helpers import ROOT, tiny_args, write_tiny_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_dataset(str(tmp_path_factory.mktemp("tiny-data-mp")))


def _launch_two_processes(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", os.path.join(ROOT, "examples", "run_train.py"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("quantizer", ["vq", "optvq"])
def test_two_processes_equal_one_process_on_the_same_global_batch(tiny_data, tmp_path, quantizer):
    import run_train

    overrides = ["--learning_rate", "1e-4", "--max_train_steps", "3", "--no-random_crop", "--logging_steps", "1"]
    two = str(tmp_path / "two")
    args = tiny_args(tiny_data, two, *overrides)
    args[args.index("--train_batch_size") + 1] = "4"
    args[args.index("--report_to") + 1] = "tensorboard"
    if quantizer == "vq":
        args[args.index("--config_overrides") + 1] += ",quantizer_type=vq,num_heads=1"
    result = _launch_two_processes(args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 processes" in result.stderr + result.stdout

    one = str(tmp_path / "one")
    single = tiny_args(tiny_data, one, *overrides)
    single[single.index("--train_batch_size") + 1] = "8"
    single[single.index("--config_overrides") + 1] = args[args.index("--config_overrides") + 1]
    single[single.index("--report_to") + 1] = "tensorboard"
    run_train.main(single)

    m_two, m_one = (json.load(open(os.path.join(d, "metrics.json"))) for d in (two, one))
    assert m_two["num_processes"] == 2 and m_two["total_batch_size"] == 8 == m_one["total_batch_size"]
    assert m_two["learning_rate"] == pytest.approx(m_one["learning_rate"])
    w_two, w_one = (load_file(os.path.join(d, "model.safetensors")) for d in (two, one))
    for key in w_one:
        assert torch.allclose(w_two[key], w_one[key], rtol=1e-4, atol=1e-5), key
    # Evaluation is sharded and reduced: same images counted once, same numbers.
    assert m_two["num_eval_images"] == m_one["num_eval_images"] == 12
    assert m_two["psnr"] == pytest.approx(m_one["psnr"], abs=1e-3)
    assert m_two["codebook_usage"] == pytest.approx(m_one["codebook_usage"])
    # The logged training metrics are reduced over both processes: each step's losses and codebook statistics are
    # those of the whole global batch (one process's half alone gives other numbers).
    logged_two, logged_one = _train_scalars(two), _train_scalars(one)
    assert set(logged_two) == set(logged_one) >= {"train/loss", "train/l1", "train/codebook_usage", "train/perplexity"}
    for tag in logged_one:
        if tag != "train/reconstruction_spread":  # the main process's last batch, a diagnostic
            assert [step for step, _ in logged_two[tag]] == [step for step, _ in logged_one[tag]] == [1, 2, 3], tag
            assert [v for _, v in logged_two[tag]] == pytest.approx([v for _, v in logged_one[tag]], rel=1e-3,
                                                                    abs=1e-6), tag
    # Only the main process wrote: one final model, no temporary folders.
    assert not [n for n in os.listdir(two) if n.startswith(".tmp")]
    if quantizer == "optvq":
        # Stopped after 2 steps and resumed with 2 processes, the run ends with the uninterrupted run's weights.
        resumed = str(tmp_path / "resumed")
        args_resumed = [resumed if a == two else a for a in args]
        for extra in (["--stop_after_steps", "2"], ["--resume_from_checkpoint", "latest"]):
            result = _launch_two_processes(args_resumed + extra)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert os.path.isdir(os.path.join(resumed, "checkpoint-2"))
        w_resumed = load_file(os.path.join(resumed, "model.safetensors"))
        assert all(torch.equal(w_resumed[key], w_two[key]) for key in w_two)


def _train_scalars(output_dir: str) -> dict:
    """{tag: [(step, value), ...]} of the `train/` scalars a run logged to TensorBoard (its event files, the
    hyperparameters' included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for folder, _, files in os.walk(os.path.join(output_dir, "logs")):
        for name in files:
            if name.startswith("events.out.tfevents"):
                accumulator = EventAccumulator(os.path.join(folder, name)).Reload()
                for tag in accumulator.Tags()["scalars"]:
                    if tag.startswith("train/"):
                        assert tag not in scalars, f"{tag} logged twice"
                        scalars[tag] = [(event.step, event.value) for event in accumulator.Scalars(tag)]
    return scalars
