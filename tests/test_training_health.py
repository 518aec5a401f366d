"""Training must learn, and a run that does not must say so.

* The learning guard: the tiny model trained by `examples/run_train.py` for 100 steps beats the mean-image baseline
  by a clear margin for every seed tried, so a change that breaks training (the straight-through estimator, the
  optimizer, the learning-rate schedule, the initialization...) fails CI instead of a newcomer's `make demo`.
  Calibration (docs/benchmarks.md, "Learning guard"): healthy gains over the baseline are 2.9 to 6.3 dB across seeds
  0-9 (5.4 to 6.0 dB for the seeds used here); with a broken straight-through estimator -0.7 to +1.3 dB; with a
  learning rate of ~0 -1.6 to -1.2 dB; with PyTorch's default initialization of the small CNN (before issue 11)
  -0.9 to -0.2 dB.
* Dead-run detection: a run killed by an absurd learning rate is flagged in the log, the summary and
  `metrics.json`, and `--fail_on_collapse` turns it into exit status 3.
* Divergence: a run whose latents explode or whose loss turns NaN stops at that step (in one process, and in two
  gloo processes, which stop together instead of hanging), keeps the finite weights of the step before, and says
  DIVERGED on every channel (log, progress bar, summary, metrics.json, model card) with exit status 4.
"""

import json
import logging
import math
import os
import runpy
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from training_helpers import EXAMPLES, ROOT, free_port, tiny_args, write_tiny_dataset

import run_train  # noqa: E402  (examples/ is on sys.path through training_helpers)

GUARD_SEEDS = (0, 1, 2)
GUARD_STEPS = 100
GUARD_LEARNING_RATE = 3e-4  # x batch 8 = 2.4e-3
GUARD_MARGIN_DB = 2.5


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_dataset(str(tmp_path_factory.mktemp("health_data")))


@pytest.mark.parametrize("seed", GUARD_SEEDS)
def test_training_beats_the_mean_image_baseline(tiny_data, tmp_path, seed):
    output = str(tmp_path / "run")
    metrics = run_train.main(tiny_args(tiny_data, output, "--seed", str(seed), "--max_train_steps", str(GUARD_STEPS),
                                       "--learning_rate", str(GUARD_LEARNING_RATE)))
    gain = metrics["psnr"] - metrics["mean_image_psnr"]
    assert gain >= GUARD_MARGIN_DB, (
        f"seed {seed}: PSNR {metrics['psnr']:.2f} dB beats the mean image ({metrics['mean_image_psnr']:.2f} dB) by "
        f"only {gain:.2f} dB after {GUARD_STEPS} steps (healthy runs: 2.9 to 6.3 dB); training is broken")
    # A healthy run is not flagged, and the file says so.
    assert metrics["collapsed"] is False and metrics["collapse_reasons"] == []
    with open(os.path.join(output, "metrics.json")) as handle:
        saved = json.load(handle)
    assert saved["collapsed"] is False
    assert saved["psnr_gain_over_mean_image"] == pytest.approx(gain)
    assert saved["reconstruction_spread"] > 0.5


def test_a_collapsed_run_is_reported_loudly_and_never_as_a_success(tiny_data, tmp_path, caplog, capsys, monkeypatch):
    output = str(tmp_path / "dead")
    # lr 1e-2 x batch 8: the decoder dies within a few steps and paints one image for every input.
    args = tiny_args(tiny_data, output, "--max_train_steps", "30", "--learning_rate", "1e-2",
                     "--validation_steps", "20", "--fail_on_collapse")
    with caplog.at_level(logging.WARNING, logger="optvq_hf.run_train"):
        monkeypatch.setattr(sys, "argv", [os.path.join(EXAMPLES, "run_train.py"), *args])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(os.path.join(EXAMPLES, "run_train.py"), run_name="__main__")
    assert exit_info.value.code == run_train.COLLAPSE_EXIT_CODE == 3

    with open(os.path.join(output, "metrics.json")) as handle:
        metrics = json.load(handle)
    assert metrics["collapsed"] is True
    assert metrics["reconstruction_spread"] < 0.05
    assert metrics["psnr"] < metrics["mean_image_psnr"] + 1.0
    assert any("same for every image" in reason for reason in metrics["collapse_reasons"])
    # The log warns at the validation step and at the end.
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert any(message.startswith("step 20: COLLAPSED RUN") for message in warnings)
    assert any("final model COLLAPSED" in message for message in warnings)
    # The summary says it failed, not "done".
    printed = capsys.readouterr()
    assert "training FAILED: the model COLLAPSED" in printed.out
    assert "training done" not in printed.out
    assert '"collapsed": true' in printed.out
    # The progress bar's verdict after the validation step.
    assert "eval=COLLAPSED" in printed.err
    # The model card does not publish its numbers as a result without the warning.
    with open(os.path.join(output, "README.md")) as handle:
        assert "this run collapsed" in handle.read()


def test_fail_on_collapse_keeps_exit_status_zero_for_a_healthy_run(tiny_data, tmp_path, monkeypatch, capsys):
    args = tiny_args(tiny_data, str(tmp_path / "ok"), "--max_train_steps", str(GUARD_STEPS), "--learning_rate",
                     str(GUARD_LEARNING_RATE), "--validation_steps", "50", "--fail_on_collapse")
    monkeypatch.setattr(sys, "argv", [os.path.join(EXAMPLES, "run_train.py"), *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(EXAMPLES, "run_train.py"), run_name="__main__")
    assert exit_info.value.code == 0
    printed = capsys.readouterr()
    assert "Verdict: healthy" in printed.out
    assert "eval=" in printed.err and "eval=COLLAPSED" not in printed.err



# lr 1 x batch 8, warmed up linearly over 30 steps: the latents leave the codebook's region (100 times its largest
# coordinate) within a few steps (step 3 here) and pass 1e6 within the first 10 (step 6 here, with that check alone;
# the tiny model's trajectory is erratic, so the checks below hold for whichever step it is). Evaluations and
# checkpoints every step, the last 2 kept: the last ones before the divergence must survive it.
DIVERGING = ("--max_train_steps", "40", "--learning_rate", "1", "--lr_scheduler", "linear", "--lr_warmup_steps", "30",
             "--validation_steps", "1", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--seed", "0")


def _check_diverged_outputs(output: str, metrics: dict, by_magnitude: bool = False) -> int:
    """The channels a diverged run writes to its folder: metrics.json, the model card, the kept (finite) weights, the
    checkpoints; returns the step it diverged at. `by_magnitude`: stopped by the 1e6 limit, else by the latents'
    ratio to the codebook (the default limits)."""
    step = metrics["diverged_at_step"]
    assert metrics["diverged"] is True and 2 <= step <= 10 and metrics["global_step"] == step - 1
    if by_magnitude:
        assert metrics["divergence_latent_magnitude"] > 1e6
        assert any("latents reached a magnitude" in reason for reason in metrics["divergence_reasons"])
    else:
        assert 100 < metrics["divergence_latent_codebook_ratio"] and metrics["divergence_latent_magnitude"] < 1e6
        assert any("times the codebook's largest coordinate" in reason for reason in metrics["divergence_reasons"])
    assert metrics["last_eval"]["step"] == step - 1 and math.isfinite(metrics["last_eval"]["psnr"])
    assert metrics["final_model_saved"] is True
    # The last good checkpoint is kept; nothing was saved at or after the diverged step.
    assert metrics["last_checkpoint"] == os.path.join(output, f"checkpoint-{step - 1}")
    assert max(int(name.split("-")[1]) for name in os.listdir(output) if name.startswith("checkpoint-")) == step - 1
    weights = load_file(os.path.join(output, "model.safetensors"))
    assert all(bool(torch.isfinite(tensor).all()) for tensor in weights.values())
    with open(os.path.join(output, "README.md")) as handle:
        assert f"Warning: this run diverged at step {step}" in handle.read()
    return step


def test_a_diverged_run_stops_and_is_reported_on_every_channel(tiny_data, tmp_path, caplog, capsys, monkeypatch):
    output = str(tmp_path / "diverged")
    monkeypatch.setattr(sys, "argv", [os.path.join(EXAMPLES, "run_train.py"), *tiny_args(tiny_data, output,
                                                                                         *DIVERGING)])
    with caplog.at_level(logging.WARNING, logger="optvq_hf.run_train"):
        with pytest.raises(SystemExit) as exit_info:  # no --fail_on_collapse needed: divergence always fails
            runpy.run_path(os.path.join(EXAMPLES, "run_train.py"), run_name="__main__")
    assert exit_info.value.code == run_train.DIVERGENCE_EXIT_CODE == 4
    with open(os.path.join(output, "metrics.json")) as handle:
        step = _check_diverged_outputs(output, json.load(handle))
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert any(message.startswith(f"step {step}: DIVERGED RUN at step {step}") for message in warnings)
    assert any(message.startswith(f"The run DIVERGED at step {step}") for message in warnings)
    printed = capsys.readouterr()
    assert f"training FAILED: the run DIVERGED at step {step}" in printed.out and "training done" not in printed.out
    assert f"The last evaluation before it: step {step - 1}" in printed.out and '"diverged": true' in printed.out
    assert "run=DIVERGED" in printed.err


def test_latents_past_float32s_limit_end_the_run_when_the_codebook_check_is_off(tiny_data, tmp_path):
    """`--max_latent_codebook_ratio 0`: the same run goes on until its latents pass `--max_latent_magnitude` (1e6),
    later than the default check stops it, and is reported the same way."""
    output = str(tmp_path / "diverged-late")
    metrics = run_train.main(tiny_args(tiny_data, output, *DIVERGING, "--max_latent_codebook_ratio", "0"))
    step = _check_diverged_outputs(output, metrics, by_magnitude=True)
    with open(os.path.join(output, "metrics.json")) as handle:
        assert json.load(handle)["diverged_at_step"] == step


@pytest.mark.parametrize("preset, overrides", [("optvq-mnist", {}), ("vq-mnist", {"quantization_loss": "l2"})])
def test_a_codebook_that_starts_far_smaller_than_its_latents_is_not_a_divergence(tiny_data, tmp_path, preset,
                                                                                 overrides):
    """A codebook initialized at 1e-3 of its usual scale (as taming's uniform(-1/K, 1/K) is) puts the latents ~600
    times beyond its largest coordinate at step 1, although the quantization loss pulls the codes to the latents: the
    codebook check starts only once the latents have been within its limit, so this run trains to the end, healthy,
    while the absolute limit still guards it."""
    from optvq_hf import OptVQConfig, OptVQModel
    from training_helpers import TINY_OVERRIDES

    sizes = {key: int(value) for key, value in (item.split("=") for item in TINY_OVERRIDES.split(","))}
    torch.manual_seed(0)
    model = OptVQModel(OptVQConfig.from_preset(preset, **sizes, **overrides))
    model.quantizer.set_codebook(model.quantizer.codebook.detach() * 1e-3)
    with torch.no_grad():
        latents = model.encode(torch.rand(2, 1, 16, 16) * 2 - 1, return_dict=True).latents
    assert latents.abs().max() > 100 * model.quantizer.codebook.abs().max()  # outside the limit from the start
    pretrained = str(tmp_path / "small-codebook")
    model.save_pretrained(pretrained)
    args = tiny_args(tiny_data, str(tmp_path / "run"), "--max_train_steps", "12", "--learning_rate", "3e-4")
    args[args.index("--model_config_name_or_path") + 1] = pretrained
    del args[args.index("--config_overrides"):args.index("--config_overrides") + 2]
    metrics = run_train.main(args)
    assert metrics["diverged"] is False and metrics["global_step"] == 12 and math.isfinite(metrics["psnr"])


def test_weights_that_break_the_forward_pass_end_the_run_as_diverged_without_saving_them(tiny_data, tmp_path):
    """lr 10 x batch 8: one update takes the latents past what the quantizer accepts (1e15); the forward pass's
    ValueError becomes the verdict instead of a traceback. The kept weights are finite, but their latents are beyond
    evaluation, so no score is reported; a healthy run records `diverged: false`."""
    output = str(tmp_path / "broken")
    metrics = run_train.main(tiny_args(tiny_data, output, "--max_train_steps", "5", "--learning_rate", "10",
                                       "--lr_scheduler", "constant"))
    assert metrics["diverged"] is True and metrics["diverged_at_step"] == 2
    assert metrics["divergence_reasons"][0].startswith("The model refused the latents")
    assert "psnr" not in metrics and metrics["last_eval"] is None and metrics["final_model_saved"] is True
    assert run_train.exit_status(metrics) == 4 == run_train.exit_status(metrics, fail_on_collapse=True)
    assert run_train.exit_status({"diverged": False, "collapsed": True}) == 0
    assert run_train.exit_status({"diverged": False, "collapsed": True}, fail_on_collapse=True) == 3


def test_two_processes_stop_together_when_the_run_diverges(tiny_data, tmp_path):
    """2 gloo processes (torchrun): both ranks reach the verdict at the same step and exit with status 4; the
    command ends (a rank that stopped alone would leave the other waiting in a collective until the timeout)."""
    output = str(tmp_path / "diverged-2")
    args = tiny_args(tiny_data, output, *DIVERGING)
    args[args.index("--train_batch_size") + 1] = "4"  # global batch 8, as in one process
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), os.path.join(EXAMPLES, "run_train.py"), *args]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
    log = completed.stdout + completed.stderr
    assert completed.returncode != 0, log[-3000:]
    # The main process exits with the divergence status once it has written everything (the other rank with 0, so
    # that torchrun does not stop the main one early); no worker raised, none was killed.
    assert log.count("exitcode  : 4") == 1 and "rank      : 0 (local_rank: 0)" in log, log[-3000:]
    assert log.count("Traceback (most recent call last)") == 1 and "ChildFailedError" in log, log[-3000:]
    assert "closing signal" not in log, log[-3000:]
    with open(os.path.join(output, "metrics.json")) as handle:
        metrics = json.load(handle)
    assert metrics["num_processes"] == 2
    assert metrics["diverged"] is True and metrics["final_model_saved"] is True
    assert metrics["global_step"] == metrics["diverged_at_step"] - 1 >= 1
    assert metrics["divergence_latent_codebook_ratio"] > 100  # the ratio's maximum over both ranks
    assert os.path.isfile(os.path.join(output, "model.safetensors"))
    assert "training FAILED: the run DIVERGED" in completed.stdout

@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_the_main_process_waits_for_its_sibling_workers_to_exit(tmp_path):
    """The main process exits with the verdict's status only after the launcher's other workers (same parent, same
    command line) have exited: two copies of one script, one still busy for a few seconds, the other waiting."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {EXAMPLES!r})\n"
        "if os.environ['ROLE'] == 'busy':\n"
        "    open(os.environ['STARTED'], 'w').close()\n"
        "    time.sleep(4)\n"
        "    open(os.environ['DONE'], 'w').close()\n"
        "else:\n"
        "    from run_train import wait_for_sibling_workers\n"
        "    while not os.path.exists(os.environ['STARTED']):\n"
        "        time.sleep(0.05)\n"
        "    left = wait_for_sibling_workers(timeout=60)\n"
        "    print(left, os.path.exists(os.environ['DONE']))\n")
    env = dict(os.environ, STARTED=str(tmp_path / "started"), DONE=str(tmp_path / "done"))
    busy = subprocess.Popen([sys.executable, str(script)], env=dict(env, ROLE="busy"))
    waiter = subprocess.run([sys.executable, str(script)], env=dict(env, ROLE="wait"), capture_output=True,
                            text=True, timeout=120)
    busy.wait(timeout=60)
    assert waiter.returncode == 0, waiter.stderr[-2000:]
    assert waiter.stdout.split() == ["True", "True"]  # no sibling left, and the busy one had finished its work


def test_the_makefile_demo_runs_the_setting_the_summary_describes():
    """The final summary quotes `make demo`'s measured PSNR range (run_train.DEMO_EXPECTED_PSNR) for the setting
    run_train.DEMO_SETTING; the Makefile must still run exactly that setting (else re-run the seed sweep of
    docs/benchmarks.md and update both)."""
    import re

    makefile = open(os.path.join(os.path.dirname(EXAMPLES), "Makefile")).read().replace("\\\n", " ")
    demo_args = re.search(r"^DEMO_ARGS\s*=\s*(.*)$", makefile, re.M).group(1).split()
    args = run_train.parse_args(demo_args)
    assert run_train.is_demo_setting(args)
    assert args.fail_on_collapse and args.seed == 42
    assert re.search(r"^demo: install\n\t\$\(BIN\)/python examples/run_train.py \$\(DEMO_ARGS\) \$\(DEMO_EXTRA\)$",
                     makefile, re.M)
    assert "TBD" not in run_train.DEMO_EXPECTED_PSNR
