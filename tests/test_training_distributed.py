"""The distributed pieces of optvq_hf.training (codebook initialization, evaluation, running means of the loss terms)
with 2 real gloo processes on uneven shards equal one process on all the data."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from training_helpers import free_port

HERE = pathlib.Path(__file__).resolve().parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist-training") / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent / "src"))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(HERE / "training_distributed_worker.py"), str(out)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(out.read_text())


def test_codebook_initialization_gathers_uneven_shards_and_broadcasts(results):
    assert results["rows"][0] == results["rows"][1] > 16  # every row of both processes, as one process on all
    assert results["replicas_equal"] and results["equals_one_process"] and results["codebook_changed"]


def test_evaluation_is_reduced_over_uneven_shards(results):
    distributed, single = results["eval"]
    assert results["eval_same_on_ranks"] and distributed["num_eval_images"] == 5
    sums = ("psnr", "reconstruction_spread")  # float sums: equal up to the order of the additions
    assert distributed.keys() == single.keys()
    for key in sums:
        if key in single:
            assert distributed[key] == pytest.approx(single[key], abs=1e-9), key
    assert {k: v for k, v in distributed.items() if k not in sums} == {k: v for k, v in single.items() if k not in sums}
    assert results["eval_counts_equal"]


def test_running_means_average_every_value_of_every_process(results):
    on_rank0, on_rank1 = results["means"]
    assert on_rank0 == on_rank1 == {"l1": pytest.approx(1.5), "loss": pytest.approx(3.0)}


def test_divergence_seen_by_one_rank_is_the_verdict_of_every_rank(results):
    """The per-step divergence signal is reduced with a max, so a rank that sees NaN latents, an Inf loss, a failed
    forward pass or latents far outside the codebook stops every rank at the same step (a rank stopping alone would hang the others in a collective)."""
    on_rank0, on_rank1 = results["divergence"]
    assert on_rank0 == on_rank1
    (healthy, _, _), (nan_latents, *nan_verdict), (inf_loss, *inf_verdict), (failed, *failed_verdict), \
        (outside, *outside_verdict) = on_rank0
    assert healthy == [0.0, 3.0, 6.0] and not on_rank0[0][1]  # the larger of the two ranks' latents, over 0.5
    assert nan_latents == [0.0, float("inf"), float("inf")] and nan_verdict[0]
    assert len(nan_verdict[1]) == 1 and "magnitude of inf" in nan_verdict[1][0]
    assert inf_loss == [1.0, 1.0, 2.0] and inf_verdict == [True, ["The training loss is NaN or Inf."]]
    assert failed == [2.0, float("inf"), float("inf")] and failed_verdict[0]
    assert len(failed_verdict[1]) == 1 and "refused the latents" in failed_verdict[1][0]
    assert outside == [0.0, 60.0, 120.0] and outside_verdict[0]  # rank 0's ratio, on both ranks
    assert len(outside_verdict[1]) == 1 and "120 times the codebook's largest coordinate" in outside_verdict[1][0]
