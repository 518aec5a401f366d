"""Global Sinkhorn (assignment and soft plan) across 2 real gloo processes equals one process on the concatenated
batch; OT-VAE's targets follow training / eval mode and `process_group`."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from training_helpers import free_port

HERE = pathlib.Path(__file__).resolve().parent


def run_two_ranks(worker: str, out: pathlib.Path) -> dict:
    """Run `tests/<worker>` under torchrun with 2 gloo processes; return the JSON it wrote to `out`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent / "src"))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(HERE / worker), str(out),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_two_ranks("sinkhorn_distributed_worker.py", tmp_path_factory.mktemp("dist") / "results.json")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["all_uneven", "all_streaming", "dim", "none", "empty_rank", "all_ranks_differ"])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(results, case):
    result = results[case]
    assert result["mismatches"] == 0, result
    assert result["default_blocks_mismatches"] == 0, result
    assert result["local_differs"], "the case cannot tell a global plan from a per-rank one"


@pytest.mark.slow
def test_quantizer_syncs_in_training(results):
    result = results["quantizer"]
    assert result["mismatches"] == 0 and result["local_differs"], result
    assert result["unsynced_is_local"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    ["plan_all", "plan_dim", "plan_exact", "plan_empty_rank", "plan_dim_empty_rank", "plan_none_empty_rank",
     "plan_exact_empty_rank", "plan_ranks_differ"],
)
def test_soft_plan_of_two_ranks_equals_one_process(results, case):
    result = results[case]
    assert result["rows"][0] == result["rows"][1] == result["rows"][2], result  # a rank without rows returns (0, K)
    # epsilon = 1e3 ("exact"): logits of thousands of nats, where one float32 ulp (~6e-5 nats) is what a cost scale
    # differing in its last float64 digit (the moments combined over ranks) can move an entry by
    tolerance = 1e-4 if "exact" in case else 1e-5
    assert result["max_error"] < tolerance, result
    assert result["potentials_error"] < tolerance, result
    assert result["default_blocks_error"] < 1e-5, result  # was 0.045 for plan_all: the ranks' sigmas differed
    assert result["local_differs"], "the case cannot tell a global plan from a per-rank one"


@pytest.mark.slow
def test_float64_inputs_of_two_ranks_are_rescaled_and_refused_alike(results):
    result = results["float64"]
    assert result["mismatches"] == 0 and result["distinct_codes"] > 8, result  # 1e-45: rescaled, not flushed to 0
    assert result["max_error"] < 1e-5, result
    assert result["refused_on"] == [1, 1], result  # one rank's magnitude decides for both (no rank left waiting)
    assert result["mixed_mismatches"] == 0, result  # float32 rows 1e20 apart: the largest rank's scale for both


@pytest.mark.slow
def test_otvae_targets_are_global_in_training_only_and_honor_the_process_group(results):
    result = results["otvae"]
    assert result["local_differs"], result
    assert result["synced_error"] < 1e-5, result  # training: the global batch
    assert result["group_error"] < 1e-6, result  # its own one-rank process_group: its own rows
    assert result["eval_error"] < 1e-6, result  # eval: its own rows, and no collective (rank 1 did not join)


@pytest.mark.slow
def test_eval_mode_never_synchronizes(tmp_path):
    """sinkhorn.md: "In eval mode it never synchronizes." Only rank 0 quantizes (OptVQ with Sinkhorn inference, OT-VAE's
    targets, a model's encode) while rank 1 joins no collective: a collective would fail rank 0 at its 30 s timeout."""
    result = run_two_ranks("sinkhorn_eval_worker.py", tmp_path / "eval.json")
    assert result["optvq"] and result["model"], result  # the tokens of rank 0's rows alone
    assert result["otvae"] < 1e-6, result
