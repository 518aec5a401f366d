"""Metrics shipped as evaluate modules: golden values from scikit-image / scipy, streaming, multi-process."""

import math
import os
import subprocess
import sys
import textwrap

import evaluate
import numpy as np
import pytest
import torch
from scipy import linalg
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import optvq_hf.metrics as metrics
from optvq_hf.metrics import functional
from optvq_hf.metrics.networks import ImageFeatureExtractor, LPIPSNetwork
from training_helpers import free_port


def _pair(seed=0, shape=(5, 3, 24, 20), noise=0.2):
    generator = torch.Generator().manual_seed(seed)
    references = torch.rand(shape, generator=generator) * 2 - 1
    predictions = (references + noise * torch.randn(shape, generator=generator)).clamp(-1, 1)
    return predictions, references


def _unit(x):
    return ((x.double() + 1) / 2).numpy()


def test_psnr_matches_scikit_image():
    predictions, references = _pair()
    result = metrics.load("psnr").compute(predictions=predictions, references=references)
    expected = [peak_signal_noise_ratio(_unit(r), _unit(p), data_range=1.0) for p, r in zip(predictions, references)]
    assert result["num_samples"] == 5
    assert result["psnr"] == pytest.approx(np.mean(expected), abs=1e-10)
    mse = np.mean([(( _unit(p) - _unit(r)) ** 2).mean() for p, r in zip(predictions, references)])
    assert result["psnr_of_mean_mse"] == pytest.approx(10 * np.log10(1 / mse), abs=1e-10)


def test_psnr_uint8_and_perfect_reconstruction_is_finite():
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    noisy = (images.int() + torch.randint(-3, 4, images.shape)).clamp(0, 255).to(torch.uint8)
    result = metrics.load("psnr").compute(predictions=noisy, references=images)
    expected = [peak_signal_noise_ratio(i.numpy(), n.numpy(), data_range=255) for i, n in zip(images, noisy)]
    assert result["psnr"] == pytest.approx(np.mean(expected), abs=1e-9)
    perfect = metrics.load("psnr").compute(predictions=images, references=images)
    assert perfect["psnr"] == functional.MAX_PSNR and math.isfinite(perfect["psnr_of_mean_mse"])


@pytest.mark.parametrize("shape", [(4, 3, 24, 20), (3, 1, 32, 32), (2, 11, 11)])
def test_ssim_matches_scikit_image(shape):
    predictions, references = _pair(seed=1, shape=shape, noise=0.3)
    result = metrics.load("ssim").compute(predictions=predictions, references=references)
    expected = []
    for p, r in zip(predictions, references):
        p, r = _unit(p), _unit(r)
        kwargs = dict(data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        if p.ndim == 3:
            kwargs["channel_axis"] = 0
        expected.append(structural_similarity(p, r, **kwargs))
    assert result["ssim"] == pytest.approx(np.mean(expected), abs=1e-10)


def test_ssim_rejects_small_images_and_mismatched_shapes():
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.load("ssim").compute(predictions=torch.zeros(1, 1, 8, 8), references=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        metrics.load("psnr").compute(predictions=torch.zeros(2, 1, 8, 8), references=torch.zeros(3, 1, 8, 8))


def test_streaming_equals_one_shot_bitwise():
    predictions, references = _pair(seed=2, shape=(9, 1, 16, 16))
    one_shot = metrics.load("psnr").compute(predictions=predictions, references=references)
    streaming = metrics.load("psnr")
    for chunk in (slice(0, 2), slice(2, 7), slice(7, 9)):
        streaming.add_batch(predictions=predictions[chunk], references=references[chunk])
    assert streaming.compute() == one_shot
    # Order does not matter either (fsum).
    reversed_metric = metrics.load("psnr")
    reversed_metric.add_batch(predictions=predictions.flip(0), references=references.flip(0))
    assert reversed_metric.compute() == one_shot
    single = metrics.load("psnr")
    for p, r in zip(predictions, references):
        single.add(prediction=p, reference=r)
    assert single.compute() == one_shot


def test_loading_by_path_with_evaluate():
    module = evaluate.load(os.path.join(os.path.dirname(metrics.__file__), "ssim"))
    predictions, references = _pair(seed=3, shape=(2, 1, 16, 16))
    assert module.compute(predictions=predictions, references=references)["ssim"] == pytest.approx(
        metrics.load("ssim").compute(predictions=predictions, references=references)["ssim"], abs=0)
    with pytest.raises(ValueError, match="Unknown metric"):
        metrics.load("fid")


def test_codebook_statistics_against_a_histogram():
    tokens = torch.tensor([[[0, 0], [1, 5]], [[5, 5], [5, 2]]])  # (B=2, 2, 2)
    result = metrics.load("codebook_usage", codebook_size=8).compute(predictions=tokens)
    counts = np.array([2, 1, 1, 0, 0, 4, 0, 0])
    p = counts[counts > 0] / counts.sum()
    assert result["code_counts"] == counts.tolist()
    assert result["codebook_usage"] == pytest.approx(4 / 8)
    assert result["dead_codes"] == 4 and result["used_codes"] == 4 and result["num_tokens"] == 8
    assert result["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert result["num_samples"] == 2
    # perplexity and dead_codes are the same statistics under their own names.
    assert metrics.load("perplexity", codebook_size=8).compute(predictions=tokens)["perplexity"] == result["perplexity"]
    assert metrics.load("dead_codes", codebook_size=8).compute(predictions=tokens)["dead_codes"] == 4
    uniform = metrics.load("perplexity", codebook_size=4).compute(predictions=torch.arange(4).view(2, 2))
    assert uniform["perplexity"] == pytest.approx(4.0) and uniform["codebook_usage"] == 1.0
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        metrics.load("codebook_usage", codebook_size=8).compute(predictions=torch.tensor([[8]]))
    with pytest.raises(ValueError, match="codebook_size"):
        metrics.load("codebook_usage")


def test_one_definition_of_the_codebook_statistics():
    """Training, evaluation and the three token modules share one histogram statistic; an empty histogram has
    perplexity 0 (perplexity never exceeds the number of codes used)."""
    import optvq_hf.training

    assert optvq_hf.training.codebook_statistics is functional.codebook_statistics
    empty = functional.codebook_statistics(np.zeros(8, dtype=np.int64))
    assert empty == {"codebook_usage": 0.0, "perplexity": 0.0, "dead_codes": 8, "used_codes": 0, "num_tokens": 0}
    counts = [2, 1, 1, 0, 0, 4, 0, 0]
    expected = functional.codebook_statistics(np.array(counts))
    for same in (torch.tensor(counts), torch.tensor(counts, dtype=torch.float32) + 1e-3, counts):
        assert functional.codebook_statistics(same) == expected  # float sums (reduced across processes) round
    rng = np.random.default_rng(0)
    for _ in range(20):
        histogram = rng.integers(0, 3, size=16) * rng.integers(0, 2, size=16)
        stats = functional.codebook_statistics(histogram)
        assert stats["perplexity"] <= stats["used_codes"] + 1e-9
        assert (stats["perplexity"] >= 1.0) == (stats["num_tokens"] > 0)
    tokens = torch.tensor([[0, 0, 1, 5], [5, 5, 5, 2]])
    results = [metrics.load(name, codebook_size=8).compute(predictions=tokens)
               for name in ("codebook_usage", "perplexity", "dead_codes")]
    assert results[0] == results[1] == results[2]
    assert {k: results[0][k] for k in expected} == expected


def _tiny_lpips(seed=0):
    torch.manual_seed(seed)
    network = LPIPSNetwork(stages=[[4], [6, 6]], in_channels=3)
    for lin in network.lins:
        torch.nn.init.uniform_(lin.weight, 0.1, 1.0)
    return network.eval()


def test_lpips_plumbing_with_a_small_random_network(tmp_path):
    network = _tiny_lpips()
    predictions, references = _pair(seed=4, shape=(3, 3, 16, 16))
    result = metrics.load("lpips", network=network).compute(predictions=predictions, references=references)

    # Independent computation of the LPIPS formula with the network's own layers.
    def taps(x):
        h = (x - network.shift) / network.scale
        out = []
        for index, layer in enumerate(network.features):
            h = layer(h)
            if index in network.tap_indices:
                out.append(h)
        return out

    with torch.no_grad():
        expected = torch.zeros(3)
        for lin, a, b in zip(network.lins, taps(predictions), taps(references)):
            na = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            nb = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            expected += (lin.weight.view(1, -1, 1, 1) * (na - nb) ** 2).sum(1).mean(dim=(1, 2))
    assert result["lpips"] == pytest.approx(float(expected.mean()), rel=1e-5)
    same = metrics.load("lpips", network=network).compute(predictions=references, references=references)
    assert same["lpips"] == 0.0
    # Grayscale inputs are repeated to 3 channels.
    gray = metrics.load("lpips", network=network).compute(predictions=predictions[:, :1], references=references[:, :1])
    assert gray["lpips"] > 0

    network.save_pretrained(tmp_path / "lpips-net")
    reloaded = metrics.load("lpips", network=str(tmp_path / "lpips-net"))
    assert reloaded.compute(predictions=predictions, references=references)["lpips"] == result["lpips"]
    with pytest.raises(ValueError, match="network"):
        metrics.load("lpips")


def test_lpips_original_state_dict_layout():
    network = LPIPSNetwork()
    vgg = {f"features.{k.split('.', 1)[1]}": v for k, v in network.state_dict().items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = torch.zeros(1)  # extra torchvision keys are ignored
    lins = {f"lin{i}.model.1.weight": torch.full_like(network.lins[i].weight, float(i)) for i in range(5)}
    loaded = LPIPSNetwork.from_original_state_dicts(vgg, lins)
    assert torch.equal(loaded.lins[3].weight, lins["lin3.model.1.weight"])
    assert loaded.tap_indices == [3, 8, 15, 22, 29]  # torchvision vgg16 relu1_2 ... relu5_3


def test_lpips_is_one_network_that_reads_both_weight_formats(tmp_path, monkeypatch):
    """The metric's LPIPSNetwork and the training loss's LPIPS are one network with one weight format; the earlier
    metrics format (heads `lins.{k}.weight`) and the training loss's single `lpips_vgg.safetensors` convert at load
    and give the same distances, bit for bit."""
    from safetensors.torch import load_file, save_file

    from optvq_hf.training import LPIPS, LPIPS_WEIGHTS_NAME

    assert issubclass(LPIPS, LPIPSNetwork) and LPIPS_WEIGHTS_NAME == metrics.LPIPS_WEIGHTS_NAME
    network = _tiny_lpips(seed=3)
    predictions, references = _pair(seed=6, shape=(3, 3, 16, 16))
    with torch.no_grad():
        expected = network(predictions, references)

    network.save_pretrained(tmp_path / "native")
    assert set(load_file(str(tmp_path / "native" / "model.safetensors"))) == set(network.state_dict())
    assert "lin1.model.1.weight" in network.state_dict() and not any(k.startswith("lins.") for k in network.state_dict())

    # The earlier metrics format: the same folder layout, heads named lins.{k}.weight.
    old = tmp_path / "old-format"
    old.mkdir()
    (old / "config.json").write_text((tmp_path / "native" / "config.json").read_text())
    old_state = {(f"lins.{k[3]}.weight" if k.startswith("lin") else k): v.contiguous()
                 for k, v in network.state_dict().items()}
    assert "lins.1.weight" in old_state
    save_file(old_state, str(old / "model.safetensors"))
    for loaded in (LPIPSNetwork.from_pretrained(str(old)), LPIPS.from_pretrained(str(old), filename=None)):
        with torch.no_grad():
            assert torch.equal(loaded(predictions, references), expected)
        assert all(not p.requires_grad for p in loaded.parameters())
    result = metrics.load("lpips", network=str(old)).compute(predictions=predictions, references=references)
    assert result["lpips"] == pytest.approx(float(expected.double().mean()), rel=1e-5)

    # The training loss's format: one lpips_vgg.safetensors, VGG16 layout, no config.json.
    torch.manual_seed(0)
    vgg = LPIPS()
    save_file({k: v.contiguous() for k, v in vgg.state_dict().items()}, str(tmp_path / LPIPS_WEIGHTS_NAME))
    images, targets = _pair(seed=7, shape=(2, 3, 32, 32))
    with torch.no_grad():
        reference = vgg(images, targets)
        for loaded in (LPIPSNetwork.from_pretrained(str(tmp_path / LPIPS_WEIGHTS_NAME)),
                       LPIPSNetwork.from_pretrained(str(tmp_path), filename=LPIPS_WEIGHTS_NAME)):
            assert type(loaded) is LPIPSNetwork and torch.equal(loaded(images, targets), reference)

    # A Hub repository holding only lpips_vgg.safetensors (no network: the download is intercepted).
    from huggingface_hub.errors import EntryNotFoundError

    requested = []

    def fake_download(repo_id, filename, **kwargs):
        requested.append(filename)
        if filename != LPIPS_WEIGHTS_NAME:
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(tmp_path / LPIPS_WEIGHTS_NAME)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    with torch.no_grad():
        assert torch.equal(LPIPSNetwork.from_pretrained("someone/lpips-vgg")(images, targets), reference)
    assert requested == ["model.safetensors", LPIPS_WEIGHTS_NAME]


def _reference_fid(real, fake):
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(200, 6)), rng.normal(0.3, 1.5, size=(200, 6))
    mu1, s1 = functional.mean_and_covariance(real)
    mu2, s2 = functional.mean_and_covariance(fake)
    assert functional.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_reference_fid(real, fake), rel=1e-8)
    assert functional.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_rfid_plumbing_with_a_small_random_network():
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, stride=2), torch.nn.Tanh(), torch.nn.Conv2d(5, 4, 3))
    extractor = ImageFeatureExtractor(network, image_size=20)
    predictions, references = _pair(seed=5, shape=(12, 1, 16, 16), noise=0.4)
    rfid = metrics.load("rfid", feature_extractor=extractor, batch_size=5)
    rfid.add_batch(predictions=predictions[:7], references=references[:7])
    rfid.add_batch(predictions=predictions[7:], references=references[7:])
    result = rfid.compute()
    with torch.no_grad():
        def features(x):
            unit = ((x + 1) / 2).expand(-1, 3, -1, -1)
            unit = torch.nn.functional.interpolate(unit, size=(20, 20), mode="bilinear", align_corners=False)
            return network((unit - 0.5) / 0.5).mean(dim=(2, 3)).double().numpy()
        expected = _reference_fid(features(references), features(predictions))
    assert result["num_samples"] == 12 and result["feature_dim"] == 4
    assert result["rfid"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    same = metrics.load("rfid", feature_extractor=extractor).compute(predictions=references, references=references)
    assert same["rfid"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="feature_extractor"):
        metrics.load("rfid")


_DISTRIBUTED_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    import torch.distributed as dist
    import optvq_hf.metrics as metrics
    from optvq_hf.metrics.networks import ImageFeatureExtractor, LPIPSNetwork
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(0)
    references = torch.rand(7, 1, 16, 16, generator=generator) * 2 - 1
    predictions = (references + 0.3 * torch.randn(7, 1, 16, 16, generator=generator)).clamp(-1, 1)
    tokens = torch.randint(0, 32, (7, 2, 4, 4), generator=generator)
    torch.manual_seed(0)  # the same small networks on every process
    lpips_network = LPIPSNetwork(stages=[[4], [6, 6]], in_channels=3).eval()
    for lin in lpips_network.lins:
        torch.nn.init.uniform_(lin.weight, 0.1, 1.0)
    extractor = ImageFeatureExtractor(torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, stride=2), torch.nn.Tanh(),
                                                          torch.nn.Conv2d(5, 4, 3)), image_size=20)
    networks = {"lpips": dict(network=lpips_network, batch_size=1), "rfid": dict(feature_extractor=extractor,
                                                                                 batch_size=1)}
    common = dict(num_process=world, process_id=rank, cache_dir=sys.argv[1])
    loaded = {"psnr": metrics.load("psnr", experiment_id="p", **common),
              "ssim": metrics.load("ssim", experiment_id="s", **common),
              **{name: metrics.load(name, experiment_id=name, **kwargs, **common) for name, kwargs in networks.items()}}
    usage = metrics.load("codebook_usage", codebook_size=32, experiment_id="u", **common)
    for start in range(rank, 7, 2 * world):  # uneven shards, batches of up to 2 images
        index = list(range(start, min(start + 2 * world, 7), world))
        for metric in loaded.values():
            metric.add_batch(predictions=predictions[index], references=references[index])
        usage.add_batch(predictions=tokens[index])
    results = {name: metric.compute() for name, metric in loaded.items()}
    results["usage"] = usage.compute()
    if rank == 0:
        single = {"psnr": metrics.load("psnr").compute(predictions=predictions, references=references),
                  "ssim": metrics.load("ssim").compute(predictions=predictions, references=references),
                  **{name: metrics.load(name, **kwargs).compute(predictions=predictions, references=references)
                     for name, kwargs in networks.items()},
                  "usage": metrics.load("codebook_usage", codebook_size=32).compute(predictions=tokens)}
        print("RESULT" + json.dumps({"distributed": results, "single": single}))
    else:
        assert all(v is None for v in results.values())
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_process_reduction_is_exact(tmp_path):
    script = tmp_path / "dist_metrics.py"
    script.write_text(_DISTRIBUTED_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(script), str(tmp_path / "cache")],
        capture_output=True, text=True, env=env, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    import json

    line = next(l for l in completed.stdout.splitlines() if l.startswith("RESULT"))
    payload = json.loads(line[len("RESULT"):])
    assert payload["distributed"] == payload["single"]  # every metric, LPIPS and rFID included, to the last bit
    assert payload["single"]["psnr"]["num_samples"] == 7 and payload["single"]["rfid"]["num_samples"] == 7
    assert payload["single"]["lpips"]["lpips"] > 0 and payload["single"]["rfid"]["rfid"] > 0


@pytest.mark.parametrize("name", ["psnr", "ssim", "lpips", "rfid"])
def test_any_batching_gives_the_same_result(name):
    """PSNR and SSIM are bit-identical however the images are batched; so are LPIPS and rFID when the network sees
    one image per call (`batch_size=1`), and within float32 rounding of the network otherwise (CPU and GPU kernels
    round differently for different batch sizes)."""
    torch.manual_seed(0)
    extractor = ImageFeatureExtractor(torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, stride=2), torch.nn.Tanh(),
                                                          torch.nn.Conv2d(5, 4, 3)), image_size=20)
    kwargs = {"lpips": dict(network=_tiny_lpips()), "rfid": dict(feature_extractor=extractor)}.get(name, {})
    predictions, references = _pair(seed=5, shape=(12, 3, 24, 24), noise=0.4)

    def result(splits, **extra):
        metric, start = metrics.load(name, **kwargs, **extra), 0
        for size in splits:
            metric.add_batch(predictions=predictions[start:start + size], references=references[start:start + size])
            start += size
        return metric.compute()[name]

    batchings = ([12], [7, 5], [1] * 12, [3, 9])
    exact = [result(splits, batch_size=1) if kwargs else result(splits) for splits in batchings]
    assert len(set(exact)) == 1 and exact[0] > 0, exact
    if kwargs:
        batched = [result(splits) for splits in batchings]
        assert batched == pytest.approx(exact, rel=1e-5)


def test_inception_layout_and_loading_from_a_folder(tmp_path):
    from optvq_hf.metrics.inception import InceptionV3

    torch.manual_seed(0)
    network = InceptionV3().eval()
    # torchvision's inception_v3 has 27,161,264 parameters; without its classifier (2,049,000) and auxiliary head
    # (3,326,696) that leaves 21,785,568: the same layout, so its (and pytorch-fid's) state dicts load.
    assert sum(p.numel() for p in network.parameters()) == 27_161_264 - 2_049_000 - 3_326_696
    state = network.state_dict()
    assert "Mixed_7c.branch3x3dbl_3b.bn.running_var" in state and "Conv2d_1a_3x3.conv.weight" in state
    extra = {**state, "fc.weight": torch.zeros(1000, 2048), "AuxLogits.fc.bias": torch.zeros(1000)}
    InceptionV3.from_state_dict(extra).save_pretrained(tmp_path / "fid-inception")
    extractor = metrics.load_feature_extractor(str(tmp_path / "fid-inception"))
    assert extractor.image_size == 299
    reloaded = extractor.network.state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in state.items())
    with torch.no_grad():
        assert network(torch.zeros(1, 3, 75, 75)).shape == (1, 2048)  # 75x75: the smallest valid input


def test_evaluation_docs_snippets_run(tmp_path, monkeypatch):
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for block in blocks:
        exec(compile(block, "<docs/evaluation.md>", "exec"), namespace)
    assert namespace["result"]["psnr"] == pytest.approx(10 * math.log10(1 / 0.05**2))
