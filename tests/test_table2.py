"""benchmarks/table2.py: the documented Table 2 recipe is the one the benchmark runs, and the benchmark runs end to
end (train, score, curves against wall time, load samples, docs section) on tiny data."""

import importlib.util
import json
import math
import os
import re
import shlex

import pytest

from training_helpers import ROOT, write_tiny_dataset

import run_train


def _table2():
    spec = importlib.util.spec_from_file_location("table2", os.path.join(ROOT, "benchmarks", "table2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _documented_command(script: str = "examples/run_train.py") -> list[str]:
    """The arguments of `script` in docs/training.md, section "Reproducing Table 2" (first bash block)."""
    with open(os.path.join(ROOT, "docs", "training.md")) as handle:
        text = handle.read()
    section = text[text.index("## Reproducing Table 2"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if script in words:
            return words[words.index(script) + 1:]
    raise AssertionError(f"no {script} command in the section")


def test_documented_recipe_is_the_benchmarks_recipe():
    table2 = _table2()
    documented = run_train.parse_args(_documented_command())
    command = table2.train_command(table2.parse_args(["--budget", "paper"]), "optvq", "out")
    benchmark = run_train.parse_args(command[command.index(os.path.join(ROOT, "examples", "run_train.py")) + 1:])
    for key, value in vars(documented).items():
        if key not in ("dataset_name", "output_dir", "report_to", "max_eval_samples"):
            assert getattr(benchmark, key) == value, key
    # two processes of one thread each, as the docs say
    assert "torch.distributed.run" in command and command[command.index("--nproc_per_node") + 1] == "2"
    assert documented.model_config_name_or_path == "optvq-mnist"


def test_documented_scoring_command_is_the_benchmarks():
    """The documented run_eval command parses (every flag exists) and scores what the issue asks: the whole test
    split of the trained model, nearest-neighbour tokens, as the benchmark does."""
    import run_eval

    table2 = _table2()
    documented = run_eval.parse_args(_documented_command("examples/run_eval.py"))
    command = table2.eval_command(table2.parse_args(["--budget", "paper"]), "optvq", "model", "out")
    benchmark = run_eval.parse_args(command[command.index(os.path.join(ROOT, "examples", "run_eval.py")) + 1:])
    assert documented.split == benchmark.split == "test"
    assert documented.max_eval_samples is None and benchmark.max_eval_samples is None  # all 10,000 digits
    assert documented.model == _documented_command()[_documented_command().index("--output_dir") + 1]


def test_table2_paper_budget_end_to_end_on_tiny_data(tmp_path):
    table2 = _table2()
    data = write_tiny_dataset(str(tmp_path / "data"), num_train=40, num_test=10, corrupt=0, size=(28, 28))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "benchmarks.md").write_text("# Benchmarks\n\n## Other section\n\ntext\n")
    out = tmp_path / "out"
    tiny = "--max_train_steps 4 --validation_steps 2 --train_batch_size 4 --num_threads 1 --codebook_init_batches 2"
    argv = ["--budget", "paper", "--quantizers", "optvq", "--dataset_name", data, "--output_dir", str(out),
            "--num_processes", "1", "--train_args", tiny, "--docs", "--docs_dir", str(docs)]
    results = table2.main(argv)
    assert set(results) == {"optvq"}
    for name, result in results.items():
        assert result["num_samples"] == 10 and result["global_step"] == 4 and result["train_wall_s"] > 0
        assert result["load"]["samples"] >= 1
    saved = json.loads((out / "table2.json").read_text())
    for curve in saved["curves"].values():
        assert [p["step"] for p in curve] == [2, 4]  # a periodic evaluation, then run_eval's score at the end
        assert curve[-1]["final"] and 0 < curve[0]["seconds"] <= curve[1]["seconds"]
    # the training batches' code usage of each logging window (every 10 steps, and the last step)
    (training,) = saved["training_usage"].values()
    assert [p["step"] for p in training] == [4] and 0 < training[0]["codebook_usage"] <= 1
    assert training[0]["seconds"] > 0
    assert (docs / "table2_curves_paper.png").stat().st_size > 0
    text = (docs / "benchmarks.md").read_text()
    title = table2.SECTION_TITLES["paper"]
    assert title in text and "## Other section" in text and "Load average" in text
    # notes written below the generated part survive a regeneration
    text = text.replace(table2.GENERATED_END + "\n", table2.GENERATED_END + "\n\nA hand-written note.\n")
    (docs / "benchmarks.md").write_text(text)
    table2.main(argv + ["--skip_existing"])
    text = (docs / "benchmarks.md").read_text()
    assert text.count(title) == 1 and "A hand-written note." in text and text.count("## Other section") == 1


def test_load_sampler_and_machine_description():
    table2 = _table2()
    with table2.LoadSampler(interval=0.01) as sampler:
        pass
    summary = sampler.summary()
    if os.path.exists("/proc/loadavg"):
        assert summary["samples"] >= 1 and summary["min"] <= summary["median"] <= summary["max"]
    machine = table2.machine_description()
    assert machine["cores"] >= 1 and machine["torch"]


@pytest.mark.parametrize("processes", [1, 2])
def test_launcher(processes):
    table2 = _table2()
    command = table2.launcher(processes)
    assert (("torch.distributed.run" in command) == (processes > 1))


def test_command_text_is_what_a_user_types():
    """The commands written into docs/benchmarks.md: `python`, repository-relative paths, the default MNIST folder
    as the docs spell it, and no run-time port."""
    import sys

    table2 = _table2()
    command = table2.train_command(table2.parse_args(["--budget", "paper", "--output_dir", "out"]), "optvq", "out/optvq")
    text = table2._command_text(command)
    assert text.startswith("python -m torch.distributed.run --nproc_per_node 2 ")
    assert "--master_port PORT examples/run_train.py " in text and sys.executable not in text and ROOT not in text
    if os.path.isdir(table2.DEFAULT_DATA):
        assert "--dataset_name ../shared/datasets/mnist " in text


def test_table2_reports_a_diverged_run_with_its_verdict_and_the_score_of_its_kept_weights(tmp_path):
    """A run that diverges (run_train exits with status 4) is not a crash of the benchmark: its row says DIVERGED at
    its step, and the finite weights it kept are scored on the test split, as the VQ baseline's are at --budget
    paper."""
    table2 = _table2()
    data = write_tiny_dataset(str(tmp_path / "data"), num_train=40, num_test=10, corrupt=0, size=(28, 28))
    out = tmp_path / "out"
    # lr 0.3 x batch 4, warmed up over 8 steps: the VQ model's latents pass 1e6 within a few steps (5 here)
    diverging = ("--max_train_steps 20 --validation_steps 1 --train_batch_size 4 --num_threads 1 "
                 "--codebook_init_batches 2 --learning_rate 0.3 --lr_scheduler linear --lr_warmup_steps 8")
    results = table2.main(["--budget", "paper", "--quantizers", "vq", "--dataset_name", data, "--output_dir",
                           str(out), "--num_processes", "1", "--train_args", diverging])
    vq = results["vq"]
    step = int(vq["verdict"].removeprefix("DIVERGED at step ").split(",")[0])
    assert vq["global_step"] == step - 1 and vq["last_eval"]["step"] == step - 1
    assert vq["num_samples"] == 10 and 0 < vq["psnr"] < 20  # the kept weights, scored by run_eval
    row = (out / "table2.md").read_text().splitlines()[-1]
    assert row.startswith("| VQ-VAE (`vq-mnist`) | DIVERGED at step ") and f"| {vq['psnr']:.2f} |" in row
    curve = json.loads((out / "table2.json").read_text())["curves"]["vq"]
    assert curve[-1]["final"] and curve[-1]["step"] == step - 1


def test_a_diverged_run_without_a_score_shows_its_last_evaluation():
    table2 = _table2()
    base = {"global_step": 5, "train_time_s": 3.0, "seconds_per_step": 0.6, "train_wall_s": 30.0}
    table = table2.render_table({
        "vq": {**base, "verdict": "DIVERGED at step 6",
               "last_eval": {"step": 4, "psnr": 12.0, "codebook_usage": 0.01, "perplexity": 2.0}},
        "optvq": {**base, "verdict": "DIVERGED at step 2", "last_eval": None}}, "paper")
    header, rule, vq_row, optvq_row = table.splitlines()
    assert header.count("|") == rule.count("|") == vq_row.count("|") == optvq_row.count("|")
    assert "| DIVERGED at step 6 | none (last evaluation, step 4: 12.00) | | 1.0 % (step 4) | | " in vq_row
    assert "| DIVERGED at step 2 | none | | | | " in optvq_row


def test_vq_latent_growth_probe_runs_and_reports_each_step(tmp_path):
    """benchmarks/vq_latent_growth.py (the probe behind docs/training.md's account of the VQ divergence) on tiny
    data: one JSON record per reported step with the numbers the docs quote."""
    spec = importlib.util.spec_from_file_location("vq_latent_growth",
                                                  os.path.join(ROOT, "benchmarks", "vq_latent_growth.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    data = write_tiny_dataset(str(tmp_path / "data"), num_train=24, num_test=4, corrupt=0)
    records = probe.main(["--dataset_name", data, "--config_overrides",
                          "codebook_size=32,base_channels=8,latent_channels=8,embed_dim=8,resolution=16",
                          "--batch_size", "4", "--steps", "3", "--every", "1", "--schedule_steps", "100"])
    assert [record["step"] for record in records] == [1, 2, 3]
    for record in records:
        assert math.isfinite(record["latent_max"]) and record["latent_max"] >= record["latent_rms"] > 0
        assert 1 <= record["codes_used"] <= 32 and record["codebook_rms"] > 0 and len(record["encoder_conv_norms"]) > 1


def test_score_checkpoints_scores_each_checkpoint_as_run_train_scores_its_model(tmp_path):
    """benchmarks/score_checkpoints.py (the per-checkpoint evidence of docs/training.md, "Reproducing Table 2"): one
    record per checkpoint and one for the final model, whose PSNR and code usage are run_train's final evaluation of
    the same weights on the same test images; the latent-to-codebook ratio is run_train's divergence number, and
    latents blown far outside the codebook are assigned by direction alone."""
    import torch
    from safetensors.torch import load_file, save_file

    from training_helpers import tiny_args

    spec = importlib.util.spec_from_file_location("score_checkpoints",
                                                  os.path.join(ROOT, "benchmarks", "score_checkpoints.py"))
    scorer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scorer)
    data = write_tiny_dataset(str(tmp_path / "data"), num_train=24, num_test=6, corrupt=0)
    run = str(tmp_path / "run")
    metrics = run_train.main(tiny_args(data, run, "--max_train_steps", "2", "--checkpointing_steps", "1",
                                       "--learning_rate", "1e-4"))
    records = scorer.main(["--run_dir", run, "--dataset_name", data, "--batch_size", "4"])
    assert [record["step"] for record in records] == [1, 2, "final"]
    final = records[-1]
    assert final["psnr"] == pytest.approx(metrics["psnr"], abs=1e-4)
    assert final["codebook_usage"] == metrics["codebook_usage"] and final["num_images"] == 6
    assert final["collapsed"] == metrics["collapsed"] and final["mean_image_psnr"] == pytest.approx(
        metrics["mean_image_psnr"])
    # step 2's weights are the final model's
    assert {k: v for k, v in records[1].items() if k != "step"} == {k: v for k, v in final.items() if k != "step"}
    assert 0 < final["latent_codebook_ratio"] < 3 and 0 <= final["direction_only_share"] < 1
    # latents blown up 1e4 times (the quantizer's input convolution scaled): far outside the codebook, every row's
    # nearest code is its direction's
    weights = load_file(os.path.join(run, "model.safetensors"))
    for name in ("quant_conv.weight", "quant_conv.bias"):
        weights[name] = weights[name] * 1e4
    blown = tmp_path / "blown"
    os.makedirs(blown)
    save_file(weights, str(blown / "model.safetensors"))
    for name in ("config.json", "preprocessor_config.json"):
        with open(os.path.join(run, name)) as source, open(blown / name, "w") as target:
            target.write(source.read())
    (record,) = scorer.main(["--run_dir", str(blown), "--dataset_name", data])
    assert record["latent_codebook_ratio"] == pytest.approx(1e4 * final["latent_codebook_ratio"], rel=1e-3)
    assert record["direction_only_share"] == 1.0
    assert torch.isfinite(torch.tensor(record["psnr"]))


def test_documented_per_checkpoint_commands_parse_and_run_the_table_recipe():
    """docs/training.md, "What the VQ row measures, and why": its commands exist as written (every flag parses),
    the training command is the Table 2 recipe with the ratio check off and a checkpoint every step, and the scorer
    reads that run's folder."""
    with open(os.path.join(ROOT, "docs", "training.md")) as handle:
        text = handle.read()
    section = text[text.index("### What the VQ row measures, and why"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    train_words, score_words = (shlex.split(line) for line in block.strip().splitlines())
    train = run_train.parse_args(train_words[train_words.index("examples/run_train.py") + 1:])
    recipe = run_train.parse_args(_documented_command())
    assert train.max_latent_codebook_ratio == 0 and train.checkpointing_steps == 1 and train.skip_final_eval
    for key in ("train_batch_size", "max_train_steps", "learning_rate", "codebook_init", "seed"):
        assert getattr(train, key) == getattr(recipe, key), key
    assert train.model_config_name_or_path == "vq-mnist"
    spec = importlib.util.spec_from_file_location("score_checkpoints",
                                                  os.path.join(ROOT, "benchmarks", "score_checkpoints.py"))
    scorer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scorer)
    scoring = scorer.parse_args(score_words[score_words.index("benchmarks/score_checkpoints.py") + 1:])
    assert scoring.run_dir == train.output_dir and scoring.max_eval_samples is None  # all 10,000 test digits
