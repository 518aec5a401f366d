"""Tests of optvq_hf.training and examples/run_train.py (single process, tiny models and data)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from optvq_hf import OptVQConfig, OptVQImageProcessor, OptVQModel
from optvq_hf.training import (
    LPIPS,
    EMAModel,
    ImagePreprocessor,
    InMemoryImageDataset,
    NLayerDiscriminator,
    OptVQLoss,
    adaptive_gan_weight,
    augment_batch,
    build_param_groups,
    build_scheduler,
    build_optimizer,
    cache_preprocessed,
    CachedImageDataset,
    collate_images,
    decode_image,
    hinge_discriminator_loss,
    kmeans,
    per_image_psnr,
    set_codebook,
)

from training_helpers import png_bytes, smooth_image, tiny_args, write_tiny_dataset  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_dataset(str(tmp_path_factory.mktemp("tiny-data")))


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------
def test_reconstruction_and_quantization_terms_match_hand_computation():
    torch.manual_seed(0)
    x, y = torch.rand(2, 1, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8) * 2 - 1
    q = torch.tensor(0.3)
    loss = OptVQLoss(l1_weight=0.5, l2_weight=2.0, quantization_weight=3.0)
    assert loss.perceptual is None and loss.discriminator is None  # weight 0: nothing built or loaded
    out = loss.generator_loss(x, y, q)
    l1 = sum(abs(a - b) for a, b in zip(x.flatten().tolist(), y.flatten().tolist())) / x.numel()
    l2 = sum((a - b) ** 2 for a, b in zip(x.flatten().tolist(), y.flatten().tolist())) / x.numel()
    assert out.l1.item() == pytest.approx(l1, rel=1e-5)
    assert out.l2.item() == pytest.approx(l2, rel=1e-5)
    assert out.loss.item() == pytest.approx(0.5 * l1 + 2.0 * l2 + 3.0 * 0.3, rel=1e-5)
    assert out.generator.item() == 0.0


def test_log_terms_name_every_term_in_use():
    torch.manual_seed(0)
    x, y = torch.rand(2, 1, 16, 16) * 2 - 1, torch.rand(2, 1, 16, 16) * 2 - 1
    plain = OptVQLoss(l2_weight=0.0)
    out = plain.generator_loss(x, y, torch.tensor(0.25))
    terms = plain.log_terms(out)
    assert set(terms) == {"loss", "l1", "quantization"}  # a zero-weight term is not logged
    assert terms["loss"].item() == out.loss.item() and not terms["loss"].requires_grad
    model = OptVQModel(OptVQConfig.from_preset("optvq-mnist", codebook_size=16, base_channels=8, latent_channels=8))
    full = OptVQLoss(perceptual_weight=1.0, perceptual_model=LPIPS(), gan_weight=0.5, disc_start=1,
                     disc_in_channels=1, disc_num_layers=2, disc_base_channels=8)
    pixels = torch.rand(2, 1, 32, 32) * 2 - 1
    output = model(pixels)
    before = full.generator_loss(pixels, output.reconstruction, output.quantization_loss, 0)
    assert set(full.log_terms(before, 0)) == {"loss", "l1", "l2", "perceptual", "quantization"}
    after = full.generator_loss(pixels, output.reconstruction, output.quantization_loss, 1,
                                last_layer_weight=model.get_last_layer_weight())
    assert set(full.log_terms(after, 1)) == {"loss", "l1", "l2", "perceptual", "quantization", "generator",
                                             "generator_weight"}
    d_out = full.discriminator_loss(pixels, output.reconstruction, 1)
    assert full.log_terms(d_out, 1) == {"discriminator": d_out.discriminator}


def test_perceptual_weight_requires_weights_and_bad_values_raise():
    with pytest.raises(ValueError, match="perceptual_model"):
        OptVQLoss(perceptual_weight=1.0)
    with pytest.raises(ValueError, match="l1_weight"):
        OptVQLoss(l1_weight=-1.0)
    with pytest.raises(ValueError, match="disc_loss"):
        OptVQLoss(disc_loss="wasserstein")


def test_lpips_loads_from_file_folder_and_hub(tmp_path, monkeypatch):
    torch.manual_seed(0)
    reference = LPIPS()
    for module in reference.modules():  # positive heads, as trained LPIPS heads are
        if isinstance(module, torch.nn.Conv2d) and module.out_channels == 1:
            module.weight.data.abs_()
    path = tmp_path / "lpips_vgg.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    # Key names are torchvision's vgg16 features and the lpips package's heads.
    keys = set(load_file(str(path)))
    assert "features.0.weight" in keys and "features.28.weight" in keys and "lin4.model.1.weight" in keys

    from_file, from_folder = LPIPS.from_pretrained(str(path)), LPIPS.from_pretrained(str(tmp_path))
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(path)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    from_hub = LPIPS.from_pretrained("someone/lpips-vgg")
    assert calls == [("someone/lpips-vgg", "lpips_vgg.safetensors")]

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    expected = reference(x, y)
    for model in (from_file, from_folder, from_hub):
        assert torch.equal(model(x, y), expected)
    assert torch.all(expected > 0)
    assert torch.allclose(reference(x, x), torch.zeros(2), atol=1e-6)
    gray = x[:, :1]
    assert torch.allclose(reference(gray, gray + 0.1), reference(gray.expand(-1, 3, -1, -1), gray.expand(-1, 3, -1, -1) + 0.1))
    assert all(not p.requires_grad for p in from_file.parameters())

    save_file({"features.0.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="do not match"):
        LPIPS.from_pretrained(str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="No LPIPS weights"):
        LPIPS.from_pretrained(str(tmp_path / "bad.safetensors").rsplit("/", 1)[0], filename="missing.safetensors")


def test_perceptual_term_enters_the_total(tmp_path):
    torch.manual_seed(0)
    lpips = LPIPS()
    x, y = torch.rand(2, 1, 16, 16) * 2 - 1, torch.rand(2, 1, 16, 16) * 2 - 1
    loss = OptVQLoss(l1_weight=0, l2_weight=0, perceptual_weight=3.0, perceptual_model=lpips, quantization_weight=0)
    out = loss.generator_loss(x, y, torch.tensor(0.0))
    assert out.loss.item() == pytest.approx(3.0 * lpips(x, y).mean().item(), rel=1e-5)


def test_hinge_loss_and_adaptive_weight_golden():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1.0))

    weight = torch.tensor([[1.0, 2.0]], requires_grad=True)
    inputs = torch.tensor([[3.0, 4.0]])
    out = inputs @ weight.T  # (1, 1) = 11
    rec = (out ** 2).sum()  # d/dw = 2 * out * inputs = [66, 88] -> norm 110
    gan = -out.sum()  # d/dw = -[3, 4] -> norm 5
    assert adaptive_gan_weight(rec, gan, weight).item() == pytest.approx(110 / (5 + 1e-4), rel=1e-6)


def test_gan_terms_switch_on_at_disc_start():
    torch.manual_seed(0)
    model = OptVQModel(OptVQConfig.from_preset("optvq-mnist", codebook_size=16, base_channels=8, latent_channels=8))
    loss = OptVQLoss(gan_weight=0.5, disc_start=3, disc_in_channels=1, disc_num_layers=2, disc_base_channels=8)
    assert isinstance(loss.discriminator, NLayerDiscriminator)
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    out = model(x)
    before = loss.generator_loss(x, out.reconstruction, out.quantization_loss, global_step=2,
                                 last_layer_weight=model.get_last_layer_weight())
    assert before.generator.item() == 0 and before.generator_weight.item() == 0
    assert loss.discriminator_loss(x, out.reconstruction, global_step=2).loss.item() == 0
    after = loss.generator_loss(x, out.reconstruction, out.quantization_loss, global_step=3,
                                last_layer_weight=model.get_last_layer_weight())
    assert after.generator_weight.item() > 0
    expected = after.reconstruction + after.quantization + after.generator_weight * after.generator
    assert after.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.discriminator_loss(x, out.reconstruction, global_step=3).loss.item() > 0
    with pytest.raises(ValueError, match="last_layer_weight"):
        loss.generator_loss(x, out.reconstruction, out.quantization_loss, global_step=3)


# ----------------------------------------------------------------------------------------------------------------
# Optimization, codebook initialization, EMA
# ----------------------------------------------------------------------------------------------------------------
def test_param_groups_follow_the_original_recipe():
    model = OptVQModel(OptVQConfig.from_preset("optvq-mnist"))
    groups = build_param_groups(model, learning_rate=1e-3, weight_decay=0.05, codebook_lr_multiplier=2.0)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}
    all_params = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(all_params) == sorted(names.values())  # every parameter exactly once
    assert "encoder.in_fc.weight" in by_group["backbone_decay"]
    assert "decoder.up1.weight" in by_group["backbone_decay"]  # ConvTranspose2d weight decays
    assert "encoder.in_fc.bias" in by_group["backbone_no_decay"]
    assert by_group["quantizer_decay"] == {"quantizer.projection.weight"}
    assert by_group["quantizer_no_decay"] == {"quantizer.embedding.weight", "quantizer.projection.bias"}
    lrs = {g["name"]: (g["lr"], g["weight_decay"]) for g in groups}
    assert lrs["quantizer_decay"] == (2e-3, 0.05) and lrs["backbone_no_decay"] == (1e-3, 0.0)


def test_onecycle_schedule_warms_up_one_percent_and_anneals():
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer([{"params": model.parameters(), "lr": 1.0}])
    assert optimizer.defaults["eps"] == 1e-7
    scheduler = build_scheduler("onecycle", optimizer, total_steps=200)
    lrs = []
    for _ in range(200):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1.0 / 25)
    peak = int(np.argmax(lrs))
    assert peak == 2 and lrs[peak] == pytest.approx(1.0, rel=1e-3)  # 1% of 201 scheduler steps
    assert lrs[-1] < 1e-3 and all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    with pytest.raises(ValueError, match="lr_scheduler"):
        build_scheduler("exotic", optimizer, 10)


def test_kmeans_recovers_separated_clusters_and_set_codebook_is_exact():
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = (centers.repeat_interleave(50, 0) + 0.1 * torch.randn(200, 2, generator=generator))
    found = kmeans(points, 4, num_iters=20, generator=generator)
    distance = torch.cdist(found, centers).min(dim=1).values
    assert distance.max() < 0.1
    assert len({tuple(torch.cdist(found, centers).argmin(1).tolist())}) == 1
    assert sorted(torch.cdist(found, centers).argmin(1).tolist()) == [0, 1, 2, 3]

    model = OptVQModel(OptVQConfig.from_preset("optvq-mnist", codebook_size=8))
    codes = torch.randn(8, 2, generator=generator)
    set_codebook(model.quantizer, codes)
    assert torch.allclose(model.get_codebook(), codes, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        set_codebook(model.quantizer, torch.randn(3, 2))


def test_ema_matches_the_formula():
    model = torch.nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(1.0)
    ema = EMAModel(model, decay=0.9)
    model.weight.data.fill_(3.0)
    ema.step(model)  # decay min(0.9, 1/10) = 0.1 -> 0.1 * 1 + 0.9 * 3
    assert ema.shadow["weight"].item() == pytest.approx(2.8)
    ema.step(model)  # decay min(0.9, 2/11)
    d = 2 / 11
    assert ema.shadow["weight"].item() == pytest.approx(d * 2.8 + (1 - d) * 3.0)
    restored = EMAModel(model, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 2 and restored.decay == 0.9
    restored.copy_to(model)
    assert model.weight.item() == pytest.approx(ema.shadow["weight"].item())


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def test_preprocessing_skips_corrupt_images_and_keeps_pixels(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    images = [smooth_image(rng, 16, 16) for _ in range(5)]
    records = [{"bytes": png_bytes(im), "path": None} for im in images]
    records[2] = {"bytes": b"garbage", "path": None}
    dataset = datasets.Dataset.from_dict({"image": records}, features=datasets.Features({"image": datasets.Image()}))
    processor = OptVQImageProcessor(num_channels=1)
    processed, skipped = cache_preprocessed(dataset, "image", ImagePreprocessor(processor, 16))
    assert skipped == 1 and len(processed) == 4
    memory = CachedImageDataset.maybe_in_memory(processed)
    assert isinstance(memory, InMemoryImageDataset)
    expected = np.stack([np.asarray(images[i])[None] for i in (0, 1, 3, 4)])  # 16x16 grayscale: unchanged
    assert np.array_equal(memory.images.numpy(), expected)
    batch = collate_images(memory.__getitems__([3, 0]))
    assert torch.equal(batch["images"], torch.from_numpy(expected[[3, 0]]))
    assert ImagePreprocessor(processor, 16)(b"not an image") is None
    assert decode_image(records[0]).size == (16, 16)
    # Variable shapes stay a list; None (unreadable) is dropped and counted.
    mixed = collate_images([torch.zeros(1, 16, 20, dtype=torch.uint8), None, torch.zeros(1, 18, 16, dtype=torch.uint8)])
    assert isinstance(mixed["images"], list) and mixed["num_skipped"] == 1


def test_augment_batch_crops_flips_and_scales():
    images = torch.arange(2 * 1 * 6 * 8, dtype=torch.uint8).reshape(2, 1, 6, 8)
    center = augment_batch(images, 4, random_crop=False)
    assert torch.equal(center, images[:, :, 1:5, 2:6].float() / 127.5 - 1)
    first = augment_batch(images, 4, True, True, torch.Generator().manual_seed(3))
    again = augment_batch(images, 4, True, True, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    # every output is a (possibly flipped) 4x4 window of its image
    for index in range(2):
        windows = [images[index, :, t:t + 4, l:l + 4].float() / 127.5 - 1 for t in range(3) for l in range(5)]
        assert any(torch.equal(first[index], w) or torch.equal(first[index], w.flip(-1)) for w in windows)
    with pytest.raises(ValueError, match="at least"):
        augment_batch(images, 7)


def test_per_image_psnr_golden():
    target = torch.zeros(2, 1, 2, 2) - 1  # 0 in [0, 1]
    reconstruction = target.clone()
    reconstruction[0] += 0.2  # +0.1 in [0, 1] everywhere -> mse 0.01 -> 20 dB
    reconstruction[1, 0, 0, 0] += 2.0  # one pixel at 1 of 4 -> mse 0.25 -> 6.0206 dB
    psnr = per_image_psnr(reconstruction, target)
    assert psnr[0].item() == pytest.approx(20.0, abs=1e-4)
    assert psnr[1].item() == pytest.approx(10 * math.log10(4), abs=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# The script, in process
# ----------------------------------------------------------------------------------------------------------------
def _independent_psnr(model_dir: str, data_dir: str) -> float:
    """Mean per-image PSNR of a saved model on the test split, computed without the script's code."""
    return _independent_evaluation(model_dir, data_dir)["psnr"]


def _independent_evaluation(model_dir: str, data_dir: str) -> dict:
    """Mean per-image PSNR and the code statistics of a saved model on the test split, without the script's code."""
    import datasets

    model = OptVQModel.from_pretrained(model_dir).eval()
    processor = OptVQImageProcessor.from_pretrained(model_dir)
    test = datasets.load_dataset("parquet", data_files={"test": os.path.join(data_dir, "test-00000-of-00001.parquet")})
    pixel_values = processor(list(test["test"]["image"]), return_tensors="pt").pixel_values
    with torch.no_grad():
        reconstruction = model(pixel_values).reconstruction
    unit_rec = ((reconstruction.clamp(-1, 1) + 1) / 2).double()
    unit_ref = ((pixel_values + 1) / 2).double()
    mse = ((unit_rec - unit_ref) ** 2).flatten(1).mean(1)
    counts = np.bincount(model(pixel_values).token_ids.flatten().numpy(), minlength=model.config.codebook_size)
    probabilities = counts[counts > 0] / counts.sum()
    return {"psnr": float((10 * torch.log10(1 / mse)).mean()), "dead_codes": int((counts == 0).sum()),
            "codebook_usage": float((counts > 0).mean()),
            "perplexity": float(np.exp(-(probabilities * np.log(probabilities)).sum()))}


def test_script_trains_evaluates_saves_and_counts_corrupt_images(tiny_data, tmp_path):
    import run_train

    output = str(tmp_path / "run")
    args = run_train.parse_args(tiny_args(tiny_data, output, "--max_train_steps", "4", "--learning_rate", "1e-4",
                                          "--validation_steps", "2", "--codebook_init", "kmeans",
                                          "--codebook_init_batches", "2"))
    metrics = run_train.main(args)
    on_disk = json.load(open(os.path.join(output, "metrics.json")))
    assert on_disk["global_step"] == 4 and on_disk["skipped_train_images"] == 1
    assert on_disk["num_eval_images"] == 12
    assert metrics["psnr"] == pytest.approx(on_disk["psnr"])
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "grid.png",
                 "code_usage.png", "validation/grid-000002.png", "validation/code_usage-000002.png"):
        assert os.path.isfile(os.path.join(output, name)), name
    assert not [n for n in os.listdir(output) if n.startswith(".tmp")]
    # The PSNR and code statistics the script reports are those an independent evaluation of the saved model gives.
    independent = _independent_evaluation(output, tiny_data)
    assert independent["psnr"] == pytest.approx(on_disk["psnr"], abs=1e-3)
    assert independent["dead_codes"] == on_disk["dead_codes"] and independent["codebook_usage"] == pytest.approx(
        on_disk["codebook_usage"]) and independent["perplexity"] == pytest.approx(on_disk["perplexity"], rel=1e-6)
    card = open(os.path.join(output, "README.md")).read()
    assert "## Training" in card and "psnr" in card and tiny_data in card
    from PIL import Image

    grid = Image.open(os.path.join(output, "grid.png"))
    assert grid.size[0] > grid.size[1] > 0


def test_config_overrides_and_validation_errors(tiny_data, tmp_path):
    import run_train

    assert run_train.parse_config_overrides("quantizer_type=vq,num_heads=1,channel_multipliers=[1,2,2],x=true") == {
        "quantizer_type": "vq", "num_heads": 1, "channel_multipliers": [1, 2, 2], "x": True}
    with pytest.raises(ValueError, match="key=value"):
        run_train.parse_config_overrides("oops")
    with pytest.raises(ValueError, match="train_batch_size"):
        run_train.parse_args(["--train_batch_size", "0"])
    with pytest.raises(ValueError, match="perceptual_model"):
        run_train.parse_args(["--perceptual_weight", "1"])
    output = str(tmp_path / "vq")
    # also the on-the-fly (uncached) map-style data path
    args = tiny_args(tiny_data, output, "--max_train_steps", "2", "--skip_final_eval", "--cache_preprocessed", "never")
    args[args.index("--config_overrides") + 1] += ",quantizer_type=vq,num_heads=1"
    run_train.main(args)
    config = OptVQConfig.from_pretrained(output)
    assert config.quantizer_type == "vq" and config.num_heads == 1 and config.codebook_size == 32


def test_push_to_hub_uploads_model_card_and_weights_without_network(tiny_data, tmp_path, monkeypatch):
    import huggingface_hub
    import run_train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    uploads = []

    def fake_create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def fake_upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        files = [os.path.relpath(os.path.join(d, f), folder_path) for d, _, fs in os.walk(folder_path) for f in fs]
        kept = list(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        uploads.append({"repo_id": repo_id, "files": sorted(kept),
                        "card": open(os.path.join(folder_path, "README.md")).read()})

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    output = str(tmp_path / "push")
    metrics = run_train.main(tiny_args(tiny_data, output, "--max_train_steps", "2", "--checkpointing_steps", "1",
                                       "--push_to_hub", "--hub_model_id", "me/tiny-optvq"))
    assert metrics["hub_repo_id"] == "me/tiny-optvq"
    assert len(uploads) == 1 and uploads[0]["repo_id"] == "me/tiny-optvq"
    files = uploads[0]["files"]
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "metrics.json"} <= set(files)
    assert not any(f.startswith("checkpoint-") for f in files)  # checkpoints stay local
    assert "me/tiny-optvq" in uploads[0]["card"] and "## Results" in uploads[0]["card"]


def test_stop_and_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_data, tmp_path):
    import run_train

    common = ("--max_train_steps", "6", "--checkpointing_steps", "3", "--learning_rate", "1e-4",
              "--skip_final_eval", "--use_ema", "--random_flip")
    straight = str(tmp_path / "straight")
    run_train.main(tiny_args(tiny_data, straight, *common))
    resumed = str(tmp_path / "resumed")
    partial = run_train.main(tiny_args(tiny_data, resumed, *common, "--stop_after_steps", "3"))
    assert partial == {"stopped_at_step": 3}
    assert os.path.isdir(os.path.join(resumed, "checkpoint-3")) and not os.path.exists(
        os.path.join(resumed, "model.safetensors"))
    run_train.main(tiny_args(tiny_data, resumed, *common, "--resume_from_checkpoint", "latest",
                             "--checkpoints_total_limit", "1"))
    a, b = load_file(os.path.join(straight, "model.safetensors")), load_file(os.path.join(resumed, "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert sorted(n for n in os.listdir(resumed) if n.startswith("checkpoint-")) == ["checkpoint-6"]
    # and training moved every weight away from the seeded initialization, which is where the script starts: one
    # step at lr 1e-30 without weight decay leaves the model within 1e-29 of it
    from accelerate.utils import set_seed

    set_seed(42)
    initial = OptVQModel(OptVQConfig.from_pretrained(straight)).state_dict()
    start = str(tmp_path / "start")
    run_train.main(tiny_args(tiny_data, start, "--max_train_steps", "1", "--learning_rate", "1e-30",
                             "--weight_decay", "0", "--skip_final_eval"))
    started = load_file(os.path.join(start, "model.safetensors"))
    assert all(torch.allclose(started[key], initial[key], rtol=0, atol=1e-29) for key in a)
    moved = [key for key in a if not torch.allclose(initial[key], a[key], rtol=0, atol=1e-6)]
    assert len(moved) == len(a), sorted(set(a) - set(moved))


def test_resume_is_exact_with_the_discriminator_and_streaming_data(tiny_data, tmp_path):
    """Stopping and resuming a GAN run on streamed data ends with the weights of an uninterrupted run: the
    discriminator, its optimizer and schedule come back from the checkpoint, and the stream resumes after the batches
    already seen (from step 1 on, the generator's loss depends on the discriminator)."""
    import run_train

    common = ("--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-4", "--skip_final_eval",
              "--gan_weight", "0.5", "--disc_start", "1", "--disc_num_layers", "2", "--disc_base_channels", "8",
              "--streaming", "--shuffle_buffer_size", "16")
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_train.main(tiny_args(tiny_data, straight, *common))
    assert run_train.main(tiny_args(tiny_data, resumed, *common, "--stop_after_steps", "2")) == {"stopped_at_step": 2}
    run_train.main(tiny_args(tiny_data, resumed, *common, "--resume_from_checkpoint", "latest"))
    a, b = load_file(os.path.join(straight, "model.safetensors")), load_file(os.path.join(resumed, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    halfway = load_file(os.path.join(resumed, "checkpoint-2", "model.safetensors"))
    assert not all(torch.equal(halfway[key], a[key]) for key in a)  # the resumed half did train


def test_script_with_lpips_gan_ema_accumulation_and_streaming(tiny_data, tmp_path):
    """The full recipe in one tiny run: LPIPS from a local file, PatchGAN from step 1, EMA, gradient accumulation,
    a cosine schedule, streaming data (decoded on the fly) and user validation images."""
    import run_train

    torch.manual_seed(0)
    lpips_path = tmp_path / "lpips_vgg.safetensors"
    save_file({k: v.contiguous() for k, v in LPIPS().state_dict().items()}, str(lpips_path))
    user_image = tmp_path / "mine.png"
    smooth_image(np.random.default_rng(1), 30, 24, "RGB").save(user_image)
    output = str(tmp_path / "full")
    metrics = run_train.main(tiny_args(
        tiny_data, output, "--max_train_steps", "3", "--perceptual_weight", "0.5", "--perceptual_model",
        str(lpips_path), "--gan_weight", "0.5", "--disc_start", "1", "--disc_num_layers", "2",
        "--disc_base_channels", "8", "--use_ema", "--gradient_accumulation_steps", "2", "--lr_scheduler", "cosine",
        "--streaming", "--shuffle_buffer_size", "16", "--validation_images", str(user_image), "--logging_steps", "1",
        "--report_to", "tensorboard"))
    assert metrics["global_step"] == 3 and metrics["total_batch_size"] == 16
    # 6 batches of 8 read the 48-row stream exactly once; its one corrupt row is skipped and counted
    assert metrics["skipped_train_images"] == 1
    assert metrics["psnr"] == pytest.approx(_independent_psnr(output, tiny_data), abs=1e-3)  # the saved (EMA) model
    assert os.path.isfile(os.path.join(output, "model.safetensors"))
    events = [os.path.join(d, n) for d, _, files in os.walk(os.path.join(output, "logs")) for n in files
              if n.startswith("events.out.tfevents")]
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(events[0]).Reload().Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/codebook_usage", "train/perplexity", "train/dead_codes",
                "train/l1", "train/l2", "train/perceptual", "train/quantization", "train/generator",
                "train/discriminator", "train/generator_weight", "final/psnr"):
        assert tag in scalars, (tag, scalars)
    from PIL import Image

    # 8 evaluation images + the user's image, each 16 px wide plus padding, upscaled 8x.
    assert Image.open(os.path.join(output, "grid.png")).size[0] == (9 * 16 + 10 * 2) * 8
    card = open(os.path.join(output, "README.md")).read()
    assert "LPIPS" in card and "PatchGAN" in card


def test_main_can_be_called_again_with_other_accelerate_settings(tiny_data, tmp_path):
    """benchmarks call main() several times in one process: the Accelerate state must not stick between runs."""
    import run_train

    from accelerate.state import AcceleratorState

    from optvq_hf.training import accelerate_state_conflicts

    run_train.main(tiny_args(tiny_data, str(tmp_path / "a"), "--max_train_steps", "1", "--skip_final_eval"))
    # Accelerate's state stays for the process and has no public reset: bf16 needs (and gets) a fresh process.
    assert accelerate_state_conflicts("bf16") and not accelerate_state_conflicts("no")
    metrics = run_train.main(tiny_args(tiny_data, str(tmp_path / "b"), "--max_train_steps", "1",
                                       "--mixed_precision", "bf16"))
    assert metrics["global_step"] == 1
    assert AcceleratorState().mixed_precision == "no"  # this process's state is untouched
    again = run_train.main(tiny_args(tiny_data, str(tmp_path / "c"), "--max_train_steps", "1"))  # same settings
    assert again["global_step"] == 1
    # The bf16 run (quantizer in float32) trained and evaluated like the float32 one, up to bf16 rounding.
    assert metrics["psnr"] == pytest.approx(again["psnr"], abs=0.05), (metrics["psnr"], again["psnr"])
    assert metrics["psnr"] == pytest.approx(_independent_psnr(str(tmp_path / "b"), tiny_data), abs=0.05)


def test_random_codebook_init_uses_encoder_features_of_the_training_images(tiny_data, tmp_path):
    import datasets
    import run_train

    output = str(tmp_path / "init")
    # lr 1e-30 and no decay: the one optimizer step leaves the initialized weights bit-identical.
    run_train.main(tiny_args(tiny_data, output, "--max_train_steps", "1", "--learning_rate", "1e-30",
                             "--weight_decay", "0", "--no-random_crop", "--skip_final_eval",
                             "--codebook_init", "random", "--codebook_init_batches", "4"))
    model = OptVQModel.from_pretrained(output).eval()
    processor = OptVQImageProcessor.from_pretrained(output)
    train = datasets.load_dataset("parquet", data_files=os.path.join(tiny_data, "train-00000-of-00001.parquet"),
                                  split="train").cast_column("image", datasets.Image(decode=False))
    preprocess = ImagePreprocessor(processor, 16, center_crop=True)
    arrays = [a for a in (preprocess(v) for v in train["image"]) if a is not None]
    pixels = torch.from_numpy(np.stack(arrays)).float() / 127.5 - 1
    with torch.no_grad():
        rows = model.encode_latents(pixels).permute(0, 2, 3, 1).reshape(-1, 2)
    codebook = model.get_codebook()
    nearest = torch.cdist(codebook, rows).min(dim=1).values
    assert nearest.max() < 1e-3  # every code is one of the encoder's feature rows (up to the projection's inverse)
    untouched = OptVQModel(model.config).get_codebook()  # a freshly initialized codebook is nowhere near them
    assert torch.cdist(untouched, rows).min(dim=1).values.median() > 1e-2
    assert len({tuple(c) for c in codebook.tolist()}) > 16  # and they are (mostly) distinct rows


def test_training_docs_snippets_run(tmp_path, monkeypatch):
    """Every ```python block of docs/training.md runs as written (the ```py one needs torchvision and lpips)."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert len(re.findall(r"^```py\n", text, re.M)) == 1
    monkeypatch.chdir(tmp_path)
    spaces = []
    for block in blocks:
        spaces.append({"__name__": "__docs__"})
        exec(compile(block, "<docs/training.md>", "exec"), spaces[-1])
    [loop] = [space for space in spaces if "loss_means" in space]
    [data] = [space for space in spaces if "train_dataset" in space]
    [script] = [space for space in spaces if "run_train" in space]
    assert loop["rows"] > 64 and set(loop["loss_means"].compute()) == {"loss", "l1", "l2", "quantization"}
    assert loop["metrics"]["num_eval_images"] == 16 and np.isfinite(loop["metrics"]["psnr"])
    assert len(data["train_dataset"]) == 64 and tuple(data["eval_images"].shape) == (8, 3, 32, 32)
    assert script["metrics"]["global_step"] == 2 and os.path.isfile(tmp_path / "tiny-demo" / "model.safetensors")


def test_block_policy_is_explicit_and_not_left_behind(tiny_data, tmp_path, monkeypatch):
    """run_train passes the Sinkhorn block policy explicitly and puts the process's setting back afterwards."""
    import run_train

    from optvq_hf import sinkhorn

    assert run_train.sinkhorn_block_policy("active") == "active"
    assert run_train.sinkhorn_block_policy("auto") == ("passive" if os.environ.get("OMP_WAIT_POLICY", "").upper()
                                                       == "PASSIVE" else "active")
    seen = []
    monkeypatch.setattr(run_train, "set_block_policy", lambda policy: (seen.append(policy),
                                                                        sinkhorn.set_block_policy(policy)))
    before = sinkhorn.get_block_policy()
    run_train.main(tiny_args(tiny_data, str(tmp_path / "p"), "--max_train_steps", "1", "--skip_final_eval",
                             "--sinkhorn_block_policy", "passive"))
    assert seen == ["passive", before] and sinkhorn.get_block_policy() == before


def test_the_console_commands_load_with_the_core_install_alone():
    """The package check loads every console command with no extra installed: the scripts import the `[train]` /
    `[eval]` packages only when they run."""
    import subprocess
    import sys

    code = ("import sys\n"
            "for name in ('datasets', 'accelerate', 'evaluate', 'matplotlib', 'scipy', 'skimage', 'tensorboard'):\n"
            "    sys.modules[name] = None  # not installed\n"
            "import optvq_hf_examples.run_train as train, optvq_hf_examples.run_eval as evaluation\n"
            "assert callable(train.cli) and callable(evaluation.cli)\n")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
