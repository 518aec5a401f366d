"""OT-VAE quantizer: equipartition targets, Gumbel decoding, nearest inference, config/preset plumbing."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from optvq_hf import CodebookQuantizer, OptVQConfig, OptVQModel, OptVQQuantizer
from optvq_hf.otvae import OTVAEQuantizer, equipartition_targets
from optvq_hf.otvae_kernels import compiler_available
from optvq_hf.sinkhorn import get_block_policy
from reference_optvq import reference_equipartition_plan
from training_helpers import free_port


def _plain_sinkhorn_targets(features, codebook, epsilon, num_iters):
    """Textbook Sinkhorn-Knopp in probability space (no logs), 'none' normalization: the reference."""
    cost = torch.cdist(features.double(), codebook.double())
    plan = torch.exp(-epsilon * cost)
    plan = plan / plan.sum()
    n, k = plan.shape
    for _ in range(num_iters):
        plan = plan / plan.sum(0, keepdim=True) / k
        plan = plan / plan.sum(1, keepdim=True) / n
    return plan / plan.sum(1, keepdim=True)


def test_targets_match_plain_sinkhorn_and_are_equipartitioned():
    torch.manual_seed(0)
    features, codebook = torch.randn(64, 3), torch.randn(16, 3)
    targets = equipartition_targets(features, codebook, epsilon=2.0, num_iters=50, normalization="none")
    expected = _plain_sinkhorn_targets(features, codebook, 2.0, 50)
    torch.testing.assert_close(targets.double(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(targets.sum(1), torch.ones(64))
    # Every code receives the same mass: N / K = 4 rows' worth.
    torch.testing.assert_close(targets.sum(0), torch.full((16,), 4.0), atol=1e-3, rtol=0)


@pytest.mark.parametrize("epsilon,normalization,atol", [(10.0, "all", 1e-5), (3.0, "dim", 1e-5), (1e3, "all", 1e-4),
                                                     (1e4, "all", 1e-3)])
def test_targets_are_the_engines_plan_and_exact_where_the_kernel_underflows(epsilon, normalization, atol):
    from optvq_hf.sinkhorn import sinkhorn_plan

    torch.manual_seed(2)
    features, codebook = torch.randn(300, 2), torch.randn(50, 2)
    targets = equipartition_targets(features, codebook, epsilon=epsilon, num_iters=5, normalization=normalization)
    # float64 log domain: at epsilon >= 1e3, exp(-epsilon * cost) underflows in float32 for most pairs, where the
    # engine's kernel passes decline and its exact log-domain passes answer; the error left is float32's in the logits
    expected = reference_equipartition_plan(features, codebook, epsilon, 5, normalization)
    assert torch.isfinite(targets).all() and targets.dtype == torch.float32
    torch.testing.assert_close(targets.double(), expected, atol=atol, rtol=0)
    torch.testing.assert_close(targets.sum(1), torch.ones(300))
    assert torch.equal(targets, sinkhorn_plan(features, codebook, epsilon, 5, normalization))


@pytest.mark.parametrize("epsilon,normalization,num_iters,atol", [(10.0, "all", 5, 1e-5), (3.0, "dim", 5, 1e-5),
                                                               (7.0, "none", 3, 1e-5), (10.0, "all", 0, 1e-5),
                                                               (1e3, "all", 5, 1e-4)])
def test_plan_potentials_give_every_row_of_the_plan(epsilon, normalization, num_iters, atol):
    """sinkhorn_plan_potentials: softmax_j(-distance_scale * D + code_potentials) is sinkhorn_plan's row, on the
    kernel passes and on the exact passes (epsilon 1e3), with or without a workspace."""
    from optvq_hf.sinkhorn import SinkhornWorkspace, sinkhorn_plan, sinkhorn_plan_potentials

    torch.manual_seed(4)
    features, codebook = torch.randn(300, 2) * 1.5 + 0.3, torch.randn(50, 2)
    workspace = SinkhornWorkspace()
    potentials = sinkhorn_plan_potentials(features, codebook, epsilon, num_iters, normalization, workspace=workspace)
    assert potentials.code_potentials.shape == (50,) and potentials.code_potentials.dtype == torch.float64
    assert workspace.buffer is not None and workspace.buffer.numel() >= 300 * 50  # the passes ran in it
    distances = torch.cdist(features.double(), codebook.double())
    rebuilt = torch.softmax(-potentials.distance_scale * distances + potentials.code_potentials, dim=1)
    torch.testing.assert_close(rebuilt, sinkhorn_plan(features, codebook, epsilon, num_iters, normalization).double(),
                               atol=atol, rtol=0)
    expected_scale = {"all": epsilon / (float(distances.std()) + 1e-6), "dim": epsilon / 2 ** 0.5,
                      "none": epsilon}[normalization]
    assert potentials.distance_scale == pytest.approx(expected_scale, rel=1e-5)
    again = sinkhorn_plan_potentials(features, codebook, epsilon, num_iters, normalization)
    assert again.distance_scale == potentials.distance_scale
    assert torch.equal(again.code_potentials, potentials.code_potentials)


def test_plan_potentials_edge_cases():
    from optvq_hf.sinkhorn import sinkhorn_plan_potentials

    one_code = sinkhorn_plan_potentials(torch.randn(5, 3), torch.randn(1, 3))
    assert one_code.code_potentials.shape == (1,)
    empty = sinkhorn_plan_potentials(torch.randn(0, 3), torch.randn(4, 3))
    assert empty.code_potentials.shape == (4,) and torch.isfinite(empty.code_potentials).all()
    with pytest.raises(ValueError, match="marginal_guard"):
        sinkhorn_plan_potentials(torch.randn(5, 3), torch.randn(4, 3), marginal_guard=-1.0)
    with pytest.raises(ValueError, match="workspace"):
        sinkhorn_plan_potentials(torch.randn(5, 3), torch.randn(4, 3), workspace=object())


def test_targets_spread_over_codes_where_nearest_collapses():
    torch.manual_seed(1)
    features = torch.randn(256, 2) * 0.1 + 5.0        # all features far from ...
    codebook = torch.randn(32, 2)                     # ... a codebook around the origin
    nearest = torch.cdist(features, codebook).argmin(1)
    targets = equipartition_targets(features, codebook, epsilon=10.0, num_iters=20, normalization="all")
    assert nearest.unique().numel() <= 4
    assert torch.isfinite(targets).all()
    # The targets still give every code the same mass, so training pulls every code towards the data.
    torch.testing.assert_close(targets.sum(0), torch.full((32,), 8.0), atol=1e-2, rtol=0)
    assert targets.argmax(1).unique().numel() >= 3 * nearest.unique().numel()


def _quantizer(**kwargs):
    torch.manual_seed(0)
    return OTVAEQuantizer(dim=8, codebook_size=32, num_heads=2, **kwargs)


def test_inference_is_nearest_code_and_shares_the_family_interface():
    quantizer = _quantizer().eval()
    assert isinstance(quantizer, CodebookQuantizer)
    with pytest.warns(FutureWarning, match="CodebookQuantizer"):  # it used to derive from OptVQQuantizer
        assert isinstance(quantizer, OptVQQuantizer)
    features = torch.randn(2, 8, 3, 5)
    out = quantizer(features)
    assert out.token_ids.shape == (2, 2, 3, 5) and out.quantized.shape == features.shape
    flat = features.permute(0, 2, 3, 1).reshape(-1, 4)
    nearest = torch.cdist(flat, quantizer.codebook.detach()).argmin(1)
    assert torch.equal(out.token_ids.permute(0, 2, 3, 1).reshape(-1), nearest)
    torch.testing.assert_close(out.quantized, quantizer.embed_tokens(out.token_ids))
    assert out.code_counts.sum() == 2 * 3 * 5 * 2
    sequence = quantizer(torch.randn(2, 7, 8))
    assert sequence.token_ids.shape == (2, 7, 2)


def test_loss_is_cross_entropy_to_the_targets_and_trains_codes_without_stop_gradient():
    quantizer = _quantizer(epsilon=5.0, num_iters=3).train()
    features = torch.randn(4, 8, 2, 2, requires_grad=True)
    out = quantizer(features)
    flat = features.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    codebook = quantizer.codebook.detach()
    targets = equipartition_targets(flat, codebook, 5.0, 3, "all")
    # p(k | z): the plan's own kernel before its marginals, softmax(-epsilon * D / std(D)) ("all" normalization
    # subtracts constants, which a row softmax ignores).
    distances = torch.cdist(flat.double(), codebook.double())
    log_p = torch.log_softmax(-5.0 * distances / distances.std(), dim=1)
    torch.testing.assert_close(out.loss.double(), -(targets.double() * log_p).sum(1).mean(), rtol=1e-4, atol=1e-5)
    # The loss alone moves both the encoder features and the codes.
    grads = torch.autograd.grad(out.loss, [features, quantizer.embedding.weight], retain_graph=True)
    assert all(g.abs().sum() > 0 for g in grads)
    # The decoder input is a soft Gumbel mixture of codes, differentiable w.r.t. the features (through the
    # logits) and the codes: no straight-through estimator.
    grads = torch.autograd.grad(out.quantized.sum(), [features, quantizer.embedding.weight])
    assert all(g.abs().sum() > 0 for g in grads)
    assert not torch.allclose(out.quantized, quantizer.embed_tokens(out.token_ids))


def test_hard_gumbel_decodes_exact_codes():
    quantizer = _quantizer(gumbel_hard=True).train()
    out = quantizer(torch.randn(3, 8, 2, 2))
    torch.testing.assert_close(out.quantized, quantizer.embed_tokens(out.token_ids))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="gumbel_temperature"):
        OTVAEQuantizer(dim=4, codebook_size=8, gumbel_temperature=0.0)
    with pytest.raises(ValueError, match="gumbel_temperature"):
        OptVQConfig.from_preset("otvae-mnist", gumbel_temperature=-1.0)
    with pytest.raises(ValueError, match="otvae"):
        OptVQConfig(quantizer_type="ot-vae")


def test_preset_model_roundtrip(tmp_path):
    config = OptVQConfig.from_preset("otvae-mnist", gumbel_temperature=0.5, codebook_size=64)
    model = OptVQModel(config).eval()
    assert isinstance(model.quantizer, OTVAEQuantizer) and model.quantizer.gumbel_temperature == 0.5
    pixels = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        out = model(pixels)
        torch.testing.assert_close(model.decode_tokens(out.token_ids), out.reconstruction)
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["quantizer_type"] == "otvae"
    reloaded = OptVQModel.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).reconstruction, out.reconstruction)
    assert OptVQConfig.from_preset("otvae-cifar10").in_channels == 3


_DIST = textwrap.dedent("""
    import sys, torch
    import torch.distributed as dist
    from optvq_hf.otvae import equipartition_targets
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    features, codebook = torch.randn(40, 3), torch.randn(8, 3)
    mine = equipartition_targets(features[rank * 20:(rank + 1) * 20], codebook, 3.0, 7, "dim")
    whole = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(whole, mine)
    if rank == 0:
        dist.destroy_process_group()
        single = equipartition_targets(features, codebook, 3.0, 7, "dim")
        err = (torch.cat(whole) - single).abs().max().item()
        print("MAXERR", err)
    else:
        dist.destroy_process_group()
""")


@pytest.mark.slow
def test_targets_cover_the_global_batch_across_two_processes(tmp_path):
    script = tmp_path / "dist_otvae.py"
    script.write_text(_DIST)
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
         str(free_port()), str(script)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    error = float(next(l for l in completed.stdout.splitlines() if l.startswith("MAXERR")).split()[1])
    assert error < 1e-5


@pytest.mark.parametrize("normalization", ["all", "dim", "none"])
def test_probabilities_are_the_plans_own_kernel(normalization):
    # With no Sinkhorn round the plan is its kernel exp(-epsilon * cost), rows normalized: the quantizer's p(k | z)
    # must be exactly that, so that the targets are p with the equipartition constraint imposed (same scale).
    quantizer = _quantizer(epsilon=7.0, normalization=normalization).train()
    flat, codebook = torch.randn(64, 4), quantizer.codebook.detach()
    kernel = equipartition_targets(flat, codebook, 7.0, 0, normalization)
    probabilities = torch.softmax(quantizer.logits(flat, codebook), dim=1)
    torch.testing.assert_close(probabilities, kernel, rtol=1e-4, atol=1e-6)
    assert torch.equal(probabilities.argmax(1), torch.cdist(flat, codebook).argmin(1))  # inference: nearest code


def test_loss_keeps_no_rows_by_codes_matrix_for_backward():
    quantizer = _quantizer().eval()  # eval: the loss alone (training adds the Gumbel decoding's soft sample)
    features = torch.randn(32, 8, 4, 4, requires_grad=True)  # 1,024 rows x 32 codes
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = quantizer(features)
    num_rows = 32 * 4 * 4 * 2
    # the soft targets are the one plan-sized tensor (an input, without gradient); nothing else of size N x K
    assert sorted(saved, reverse=True)[1] < num_rows * 32
    out.loss.backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0


def test_gumbel_softmax_samples_the_categorical():
    from optvq_hf.otvae import gumbel_softmax

    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).log_softmax(1).expand(200_000, 4).contiguous()
    samples = gumbel_softmax(logits, 1.0, hard=True)
    assert torch.equal(samples.sum(1), torch.ones(200_000)) and torch.isfinite(samples).all()
    # Gumbel-max: the argmax of logits + Gumbel noise is a draw from softmax(logits)
    torch.testing.assert_close(samples.mean(0), logits[0].exp(), atol=5e-3, rtol=0)
    soft = gumbel_softmax(logits[:8], 0.5)
    torch.testing.assert_close(soft.sum(1), torch.ones(8))


def _mix32(values: np.ndarray) -> np.ndarray:
    """The noise's 32-bit finalizer in numpy uint32 arithmetic (wrapping products), written apart from the package's
    int64 tensor version."""
    values = values.astype(np.uint32)
    values ^= values >> np.uint32(16)
    values *= np.uint32(0x21F0AAAD)
    values ^= values >> np.uint32(15)
    values *= np.uint32(0x735A2D97)
    values ^= values >> np.uint32(15)
    return values


def _fused_pass_uniforms(seed_state: int, shape) -> torch.Tensor:
    """The training pass's uniforms, written out: one int64 draw from torch's default generator is the seed; pair
    (i, j) gets key mix(mix(i + seed_low) + mix(j ^ seed_high)) (mod 2^32), and u = (top 23 bits + 1/2) / 2^23."""
    torch.manual_seed(seed_state)
    seed = int(torch.empty((), dtype=torch.int64).random_())
    low, high = np.uint32(seed & 0xFFFFFFFF), np.uint32((seed >> 32) & 0xFFFFFFFF)
    rows = _mix32(np.arange(shape[0], dtype=np.uint32) + low)
    codes = _mix32(np.arange(shape[1], dtype=np.uint32) ^ high)
    keys = _mix32(rows[:, None] + codes[None, :])
    return torch.from_numpy(((keys >> np.uint32(9)).astype(np.float64) + 0.5) / 2.0 ** 23)


@pytest.mark.parametrize(
    "hard, normalization, temperature, logit_scale",
    [(False, "all", 1.0, 1.0), (True, "all", 1.0, 1.0), (False, "dim", 1.0, 1.0), (False, "all", 0.7, 1.0),
     (True, "dim", 0.7, 1.0), (False, "all", 1.0, 2.5), (True, "all", 0.7, 0.6)],
)
def test_fused_training_pass_matches_float64_autograd(hard, normalization, temperature, logit_scale, monkeypatch):
    """The eager blocked training pass (its own backward, the targets rebuilt from the plan's potentials, the noise
    recomputed in backward) against the dense float64 autograd graph on the same uniforms. Covers the shared-kernel
    path (logit_scale 1: q from p without exp) and the other one, T = 1 (P / E) and T != 1."""
    _check_training_pass_against_float64(hard, normalization, temperature, logit_scale, "eager", monkeypatch)


@pytest.mark.slow
@pytest.mark.skipif(not compiler_available(), reason="torch.compile cannot build CPU kernels here")
@pytest.mark.parametrize("hard, normalization, temperature, logit_scale", [(False, "all", 1.0, 1.0),
                                                                          (True, "all", 0.7, 0.6)])
def test_compiled_training_pass_matches_float64_autograd(hard, normalization, temperature, logit_scale, monkeypatch):
    """The compiled kernels (one per direction over the whole batch, Inductor's C++) against the same float64
    reference: the default path (T = 1, shared kernel, soft) and the other branches (T != 1, own target weights,
    hard). Compiles four kernels (tens of seconds on a loaded machine; Inductor's disk cache makes reruns fast)."""
    _check_training_pass_against_float64(hard, normalization, temperature, logit_scale, "compiled", monkeypatch)
    # the row count is a dynamic dimension: another batch size runs the same compiled kernels
    from torch._dynamo.utils import counters

    quantizer = OTVAEQuantizer(8, 1024, num_heads=4, normalization=normalization, gumbel_hard=hard,
                               gumbel_temperature=temperature, logit_scale=logit_scale, training_kernel="compiled")
    graphs = counters["stats"]["unique_graphs"]
    flat = torch.randn(333, 2, requires_grad=True)
    decoded, loss, _ = quantizer.train().quantize_rows(flat, quantizer.codebook)
    (decoded.sum() + loss).backward()
    assert counters["stats"]["unique_graphs"] == graphs and torch.isfinite(flat.grad).all()


def _check_training_pass_against_float64(hard, normalization, temperature, logit_scale, kernel, monkeypatch):
    import optvq_hf.otvae

    monkeypatch.setitem(optvq_hf.otvae._DECODE_BLOCK_ENTRIES, get_block_policy(), 1 << 18)  # 256 rows: 3 blocks
    torch.manual_seed(0)  # fixed inputs: a failure must reproduce (the noise itself is seeded below)
    quantizer = OTVAEQuantizer(8, 1024, num_heads=4, normalization=normalization, gumbel_hard=hard,
                               gumbel_temperature=temperature, commitment_weight=0.5, logit_scale=logit_scale,
                               training_kernel=kernel).train()
    flat = torch.randn(600, 2, requires_grad=True)  # 1,024 codes: several blocks
    torch.manual_seed(1)
    decoded, loss, token_ids = quantizer.quantize_rows(flat, quantizer.codebook)
    upstream = torch.randn_like(decoded)
    grads = torch.autograd.grad((decoded * upstream).sum() + 3 * loss, [flat, quantizer.embedding.weight])

    targets = quantizer.targets(flat, quantizer.codebook).double()
    features, codebook = flat.double(), quantizer.codebook.double()
    distances = torch.cdist(features, codebook)
    logits = -quantizer.distance_scale(features, codebook, distances) * distances
    expected_loss = 0.5 * torch.nn.functional.cross_entropy(logits, targets)
    noise = _fused_pass_uniforms(1, tuple(logits.shape)).double().log().neg().log().neg()
    weights = torch.softmax((logits + noise) / temperature, dim=1)
    if hard:
        one_hot = torch.zeros_like(weights).scatter_(1, weights.argmax(1, keepdim=True), 1.0)
        weights = one_hot - weights.detach() + weights
    expected = weights @ codebook
    expected_grads = torch.autograd.grad((expected * upstream.double()).sum() + 3 * expected_loss,
                                         [flat, quantizer.embedding.weight])
    assert torch.equal(token_ids, weights.argmax(1))
    torch.testing.assert_close(decoded.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4 * float(expected_grad.abs().max()))


def test_training_pass_keeps_no_rows_by_codes_tensor_and_same_seed_same_tokens():
    """Training: neither the targets, nor the softmax, nor the Gumbel sample or its noise are kept for backward (the
    noise is drawn again), and a seed fixes the draws."""
    quantizer = _quantizer().train()
    features = torch.randn(32, 8, 4, 4, requires_grad=True)  # 1,024 rows x 32 codes
    saved = []
    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = quantizer(features)
    assert max(saved) < 32 * 4 * 4 * 2 * 32
    out.loss.backward(retain_graph=True)
    grad = features.grad.clone()
    torch.manual_seed(3)
    again = quantizer(features)
    assert torch.equal(again.token_ids, out.token_ids) and torch.equal(again.quantized, out.quantized)
    features.grad = None
    again.loss.backward()
    assert torch.equal(features.grad, grad)  # the replayed noise is the forward's


def test_noise_is_standard_exponential_and_independent_between_neighbours():
    """The counter-based noise: the package's hash (numpy uint32 eagerly on CPU, int64 tensors elsewhere) equals the
    numpy version written above bit for bit,
    its uniforms are the 2^23 midpoints, E = -log u passes a Kolmogorov-Smirnov test against Exp(1) and has its
    moments, and neighbouring pairs (next code, next row, next seed) are uncorrelated and jointly uniform."""
    from optvq_hf.otvae_kernels import exponential_noise, mix32, noise_keys, uniform_noise

    torch.manual_seed(11)
    seed = int(torch.empty((), dtype=torch.int64).random_())
    rows, codes = 1024, 1024
    row_keys, code_keys = noise_keys(seed, 0, rows, codes, "cpu")
    uniforms = uniform_noise(row_keys, code_keys)  # eager CPU: numpy uint32
    assert torch.equal(uniforms.double(), _fused_pass_uniforms(11, (rows, codes)))
    # the int64 tensor version (compiled kernels, accelerators) has the same bits
    keys = mix32((row_keys[:, None] + code_keys[None, :]) & 0xFFFFFFFF)
    assert torch.equal(((keys >> 9).to(torch.float32) + 0.5) * 2.0 ** -23, uniforms)
    # a block of rows further down is the same stream's rows
    assert torch.equal(uniform_noise(*noise_keys(seed, 100, 300, codes, "cpu")), uniforms[100:300])
    assert uniforms.dtype == torch.float32 and 0 < uniforms.min() and uniforms.max() < 1
    steps = uniforms.double() * 2 ** 23 - 0.5
    assert torch.equal(steps, steps.round())
    noise = exponential_noise(*noise_keys(seed, 0, rows, codes, "cpu")).double()
    assert torch.isfinite(noise).all() and noise.min() > 0 and noise.max() < 16.7
    values = np.sort(noise.flatten().numpy())
    n = values.size
    empirical = np.arange(1, n + 1) / n
    ks = max(np.abs(empirical - (1 - np.exp(-values))).max(), np.abs(empirical - 1 / n - (1 - np.exp(-values))).max())
    assert ks < 1.95 / n ** 0.5  # the KS test's 0.1 % critical value
    # Exp(1): mean 1, variance 1, third moment 6 (standard errors 0.001, 0.003, 0.02 at n = 2^20)
    assert abs(values.mean() - 1) < 0.006 and abs(values.var() - 1) < 0.02 and abs((values ** 3).mean() - 6) < 0.15
    centered = uniforms.double() - 0.5
    other_seed = uniform_noise(*noise_keys(seed + 1, 0, rows, codes, "cpu")).double() - 0.5
    for first, second in [(centered[:, :-1], centered[:, 1:]), (centered[:-1], centered[1:]), (centered, other_seed)]:
        correlation = float((first * second).mean() / (first.std() * second.std()))
        assert abs(correlation) < 5 / first.numel() ** 0.5
        # the pairs fill an 8 x 8 grid evenly: chi-square with 63 degrees of freedom (mean 63, sd 11.2)
        cells = ((first + 0.5) * 8).long() * 8 + ((second + 0.5) * 8).long()
        counts = torch.bincount(cells.flatten(), minlength=64).double()
        expected = first.numel() / 64
        assert float(((counts - expected) ** 2 / expected).sum()) < 63 + 6 * 11.2


@pytest.mark.skipif(not compiler_available(), reason="torch.compile cannot build CPU kernels here")
def test_compiled_noise_has_the_same_bits():
    """Inductor's C++ (vectorized int64 arithmetic) gives the eager hash's bits."""
    from optvq_hf.otvae_kernels import noise_keys, uniform_noise

    keys = noise_keys(2 ** 62 + 12345, 7, 7 + 333, 1000, "cpu")
    compiled = torch.compile(uniform_noise, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(*keys), uniform_noise(*keys))


def test_training_kernel_option_and_auto_choice():
    quantizer = OTVAEQuantizer(8, 1024, num_heads=4)
    assert quantizer.training_kernel == "auto"
    assert quantizer.resolved_training_kernel(torch.empty(1000, 2)) == "eager"  # small: compiling does not pay
    big = torch.empty(1 << 12, 2)  # 4,096 rows x 1,024 codes = 2^22 pairs
    assert quantizer.resolved_training_kernel(big) == ("compiled" if compiler_available() else "eager")
    assert quantizer.resolved_training_kernel(torch.empty(1 << 12, 16)) == "eager"  # wide codes: eager
    quantizer.training_kernel = "eager"
    assert quantizer.resolved_training_kernel(big) == "eager"
    with pytest.raises(ValueError, match="training_kernel"):
        quantizer.training_kernel = "fast"
    with pytest.raises(ValueError, match="training_kernel"):
        OTVAEQuantizer(8, 16, training_kernel="triton")


@pytest.mark.skipif(not compiler_available(), reason="torch.compile cannot build CPU kernels here")
def test_a_failing_compiler_falls_back_to_the_eager_pass(monkeypatch):
    """A compiled kernel that cannot be built (here: Inductor pointed at a C++ compiler that does not exist) warns
    once, and the step runs eagerly with the same values; "auto" stays eager for the rest of the process."""
    import torch._inductor.config as inductor_config

    import optvq_hf.otvae

    monkeypatch.setattr(optvq_hf.otvae, "_compile_failures", [])
    quantizer = OTVAEQuantizer(8, 64, num_heads=4, gumbel_temperature=0.37).train()  # a kernel no test compiled
    features = torch.randn(4, 8, 4, 4, requires_grad=True)

    def step(kernel):
        quantizer.training_kernel = kernel
        torch.manual_seed(2)
        out = quantizer(features)
        return out, torch.autograd.grad(out.quantized.sum() + out.loss, features)[0]

    expected, expected_grad = step("eager")
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",), "force_disable_caches": True}):
        with pytest.warns(RuntimeWarning, match="compiled training kernel failed"):
            out, grad = step("compiled")
    assert torch.equal(out.token_ids, expected.token_ids) and torch.equal(out.quantized, expected.quantized)
    assert torch.equal(grad, expected_grad)
    quantizer.training_kernel = "auto"
    assert quantizer.resolved_training_kernel(torch.empty(1 << 16, 2)) == "eager"


def test_compiled_model_trains_through_the_fused_pass():
    """torch.compile of a whole OT-VAE model in training: the quantizer's training pass is one compiled-graph
    boundary (the plan reads values back), so no N x K matrix is built under compile either; the step matches eager."""
    torch.manual_seed(0)
    model = OptVQModel(OptVQConfig.from_preset("otvae-mnist", codebook_size=256)).train()
    model.quantizer.training_kernel = "eager"
    explanation = torch._dynamo.explain(model.quantizer)(torch.randn(2, 8, 4, 4))
    assert explanation.graph_break_count == 1
    pixels = torch.rand(4, 1, 32, 32) * 2 - 1

    def step(module):
        torch.manual_seed(5)
        out = module(pixel_values=pixels)
        loss = (out.reconstruction - pixels).abs().mean() + out.quantization_loss
        return out, torch.autograd.grad(loss, list(model.parameters()))

    expected, expected_grads = step(model)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out, grads = step(torch.compile(model, backend="aot_eager"))
    assert torch.equal(out.token_ids, expected.token_ids)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)
    rows = 4 * 8 * 8 * model.config.num_heads
    assert max(saved) < rows * 256 // 2  # half the quantizer's rows x codes (the network's largest is less)
