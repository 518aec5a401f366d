"""examples/tokenize_dataset.py on tiny real data and a tiny real model: every id equals `model.encode`, whatever the
batch size, the sharding, the number of processes (2 real gloo processes) or a kill in the middle."""

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from optvq_hf import OptVQConfig, OptVQImageProcessor, OptVQModel
from training_helpers import ROOT, free_port, write_tiny_dataset

import tokenize_dataset  # examples/ is on sys.path (training_helpers)

SCRIPT = os.path.join(ROOT, "examples", "tokenize_dataset.py")
CORRUPT = {0, 7}  # write_tiny_dataset(num_train=30, corrupt=2) puts non-images at rows 0 and 7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny OptVQ model folder (2 heads, 4x4 grid, 32 codes; no saved processor) and a 30-image parquet dataset
    with 2 corrupt rows and a `label` column equal to the row number."""
    root = tmp_path_factory.mktemp("tokenize")
    data = write_tiny_dataset(str(root / "data"), num_train=30, num_test=6, corrupt=2, size=(18, 20))
    torch.manual_seed(0)
    config = OptVQConfig.from_preset("optvq-mnist", codebook_size=32, base_channels=8, latent_channels=8, embed_dim=8,
                                     num_heads=2, resolution=16)
    OptVQModel(config).save_pretrained(root / "model")
    return {"data": data, "model": str(root / "model"), "root": root}


def source_images(data_dir, split="train"):
    import datasets

    dataset = datasets.load_dataset("parquet", data_files={split: f"{data_dir}/{split}-*.parquet"}, split=split)
    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    return [row["image"]["bytes"] for row in dataset]


def expected_tokens(model_dir, data_dir, indices, autocast=None):
    """`model.encode(pixel_values).token_ids` of each image, flattened by hand: `(y * w + x) * heads + k`."""
    import io

    model = OptVQModel.from_pretrained(model_dir).eval()
    processor = OptVQImageProcessor.from_model_config(model.config)
    raw = source_images(data_dir)
    pixels = processor([Image.open(io.BytesIO(raw[i])) for i in indices], return_tensors="pt")["pixel_values"]
    with torch.no_grad(), (autocast or torch.autocast("cpu", enabled=False)):
        token_ids = model.encode(pixels).token_ids  # (B, heads, h, w)
    batch, heads, height, width = token_ids.shape
    flat = np.zeros((batch, height * width * heads), dtype=np.int64)
    for y in range(height):
        for x in range(width):
            for k in range(heads):
                flat[:, (y * width + x) * heads + k] = token_ids[:, k, y, x].numpy()
    return flat


def load_tokens(output_dir, split="train"):
    """The Hub-layout folder read with the parquet builder (`load_dataset(folder)` also reads it, but `datasets`
    caches it by the folder's name, so two folders of one name would share a cache in this test session)."""
    import datasets

    return datasets.load_dataset("parquet", data_files={split: f"{output_dir}/data/{split}-*.parquet"}, split=split)


def run(tiny, output_dir, *extra):
    return tokenize_dataset.main(["--model_name_or_path", tiny["model"], "--dataset_name", tiny["data"],
                                  "--split", "train", "--output_dir", str(output_dir), "--disable_progress_bar",
                                  "--num_threads", "1", *extra])


def test_ids_equal_encode_for_any_batch_and_shard_size_and_the_card_records_the_layout(tiny, tmp_path):
    from huggingface_hub import DatasetCard

    summary = run(tiny, tmp_path / "a", "--shard_size", "8", "--batch_size", "3", "--keep_columns", "label")
    assert summary["skipped_images"] == 2 and summary["images"] == 28 and summary["shards_written"] == 4
    assert summary["tokens"] == 28 * 32 and summary["num_rows"] == 28
    tokens = load_tokens(tmp_path / "a")
    assert tokens.column_names == ["index", "token_ids", "label"]
    assert tokens.features["token_ids"].feature.dtype == "uint8"  # 32 codes fit in uint8
    indices = [i for i in range(30) if i not in CORRUPT]
    assert tokens["index"] == indices and tokens["label"] == indices  # kept column travels with its row
    np.testing.assert_array_equal(np.asarray(tokens["token_ids"]), expected_tokens(tiny["model"], tiny["data"], indices))

    # other batch and shard sizes, shards named in the Hub's layout: the same ids
    run(tiny, tmp_path / "b", "--shard_size", "30", "--batch_size", "7", "--dataloader_num_workers", "2")
    assert sorted(os.listdir(tmp_path / "b" / "data")) == ["train-00000-of-00001.parquet"]
    other = load_tokens(tmp_path / "b")
    assert other["index"] == indices and other["token_ids"] == tokens["token_ids"]

    card = DatasetCard.load(tmp_path / "a" / "README.md")
    meta = card.data.optvq
    assert meta["grid_size"] == [4, 4] and meta["num_heads"] == 2 and meta["codebook_size"] == 32
    assert meta["tokenizer"] == tiny["model"] and meta["sequence_length"] == 32 and meta["token_dtype"] == "uint8"
    assert meta["splits"]["train"]["skipped_images"] == 2 and meta["splits"]["train"]["num_rows"] == 28
    assert card.data.configs == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]
    # each shard records its rows and the unreadable ones
    metadata = [tokenize_dataset.read_shard_metadata(p) for p in sorted(glob.glob(f"{tmp_path}/a/data/*.parquet"))]
    assert [m["skipped_indices"] for m in metadata] == [[0, 7], [], [], []]
    assert [(m["rows_from"], m["rows_to"]) for m in metadata] == [(0, 8), (8, 16), (16, 24), (24, 30)]

    # a second split goes into the same folder and the card lists both
    run(tiny, tmp_path / "a", "--split", "test", "--keep_columns", "label")
    card = DatasetCard.load(tmp_path / "a" / "README.md")
    assert sorted(card.data.optvq["splits"]) == ["test", "train"]
    assert len(load_tokens(tmp_path / "a", "test")) == 6


def test_settings_of_a_resumed_run_must_match(tiny, tmp_path):
    run(tiny, tmp_path, "--shard_size", "8")
    again = run(tiny, tmp_path, "--shard_size", "8")  # finished: nothing to do
    assert again["shards_written"] == 0 and again["shards_resumed"] == 4 and again["num_rows"] == 28
    with pytest.raises(ValueError, match="other settings.*shard_size"):
        run(tiny, tmp_path, "--shard_size", "5")
    redone = run(tiny, tmp_path, "--shard_size", "5", "--overwrite_output_dir")
    assert redone["shards_written"] == 6 and len(os.listdir(tmp_path / "data")) == 6


def test_killed_run_leaves_no_partial_shard_and_resumes(tiny, tmp_path):
    data = write_tiny_dataset(str(tmp_path / "data"), num_train=80, num_test=1, corrupt=0, size=(16, 16), seed=3)
    output = tmp_path / "out"
    command = [sys.executable, SCRIPT, "--model_name_or_path", tiny["model"], "--dataset_name", data, "--output_dir",
               str(output), "--shard_size", "2", "--batch_size", "1", "--disable_progress_bar", "--num_threads", "1"]
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not glob.glob(f"{output}/data/*.parquet") and process.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read()[-3000:]
    done = sorted(glob.glob(f"{output}/data/*.parquet"))
    assert 1 <= len(done) < 40, f"{len(done)} shards finished before the kill"
    for path in done:  # every file under its final name is a complete shard
        table = tokenize_dataset.read_shard_metadata(path)
        assert table["rows"] == 2 and len(load_tokens_file(path)) == 2
    # a temporary file of a shard being written at the kill: removed when the run restarts
    stale = output / ".tokenize" / "tmp" / "train-00039-of-00040.parquet.12345.tmp"
    stale.write_bytes(b"half a parquet file")

    summary = run({**tiny, "data": data}, output, "--shard_size", "2", "--batch_size", "4")
    assert summary["shards_resumed"] == len(done) and summary["shards_written"] == 40 - len(done)
    assert not stale.exists()
    resumed = load_tokens(output)
    assert resumed["index"] == list(range(80))
    np.testing.assert_array_equal(np.asarray(resumed["token_ids"]), expected_tokens(tiny["model"], data, range(80)))


def load_tokens_file(path):
    import pyarrow.parquet as pq

    return pq.read_table(path)


@pytest.mark.slow
def test_two_gloo_processes_share_the_shards_and_give_the_same_ids(tiny, tmp_path):
    output = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), SCRIPT, "--model_name_or_path", tiny["model"], "--dataset_name", tiny["data"],
               "--output_dir", str(output), "--shard_size", "4", "--batch_size", "3", "--keep_columns", "label",
               "--disable_progress_bar"]
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 process(es)" in result.stderr
    metadata = [tokenize_dataset.read_shard_metadata(p) for p in sorted(glob.glob(f"{output}/data/*.parquet"))]
    assert len(metadata) == 8
    by_rank = {rank: {m["shard"] for m in metadata if m["process_index"] == rank} for rank in (0, 1)}
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]  # each process wrote its own share
    assert by_rank[0] | by_rank[1] == set(range(8))
    tokens = load_tokens(output)
    indices = [i for i in range(30) if i not in CORRUPT]
    assert tokens["index"] == indices and tokens["label"] == indices
    np.testing.assert_array_equal(np.asarray(tokens["token_ids"]), expected_tokens(tiny["model"], tiny["data"], indices))
    summary_line = [line for line in result.stderr.splitlines() if "Summary:" in line]
    assert len(summary_line) == 1 and "28 images tokenized (2 unreadable, skipped)" in summary_line[0]


def test_augmentation_variants_are_rows_with_a_variant_column(tiny, tmp_path):
    import io

    run(tiny, tmp_path / "flip", "--augment", "flip", "--max_samples", "4")
    flipped = load_tokens(tmp_path / "flip")
    assert flipped["index"] == [1, 1, 2, 2, 3, 3] and flipped["variant"] == ["center", "center_flip"] * 3

    run(tiny, tmp_path / "ten", "--augment", "ten_crop", "--max_samples", "3", "--batch_size", "2")
    ten = load_tokens(tmp_path / "ten")
    names = tokenize_dataset.variant_names("ten_crop")
    assert len(names) == 10 and ten["index"] == [1] * 10 + [2] * 10 and ten["variant"] == names * 2
    # the crops by hand: the image resized (shortest edge) and center-cropped to round(16 * 1.1) = 18, then the five
    # 16x16 crops and their mirrors, each encoded on its own
    model = OptVQModel.from_pretrained(tiny["model"]).eval()
    big = OptVQImageProcessor.from_model_config(model.config, size={"shortest_edge": 18},
                                                crop_size={"height": 18, "width": 18})
    image = Image.open(io.BytesIO(source_images(tiny["data"])[1]))
    pixels = big(image, return_tensors="pt")["pixel_values"][0]
    corners = {"center": (1, 1), "top_left": (0, 0), "top_right": (0, 2), "bottom_left": (2, 0),
               "bottom_right": (2, 2)}
    for row, name in enumerate(names):
        top, left = corners[name.removesuffix("_flip")]
        crop = pixels[:, top:top + 16, left:left + 16]
        crop = crop.flip(-1) if name.endswith("_flip") else crop
        with torch.no_grad():
            ids = model.encode(crop[None]).token_ids
        assert ten[row]["token_ids"] == ids.permute(0, 2, 3, 1).reshape(-1).tolist(), name
    # plain crops of the same image: the flip run's "center" row is the processor's own crop
    assert flipped[0]["token_ids"] == expected_tokens(tiny["model"], tiny["data"], [1])[0].tolist()


def test_streaming_and_mixed_precision(tiny, tmp_path):
    map_style = run(tiny, tmp_path / "map", "--shard_size", "8", "--max_samples", "20")
    streamed = run(tiny, tmp_path / "stream", "--shard_size", "8", "--max_samples", "20", "--streaming",
                   "--batch_size", "5")
    assert streamed["num_rows"] == map_style["num_rows"] == 18
    assert load_tokens(tmp_path / "stream")["token_ids"] == load_tokens(tmp_path / "map")["token_ids"]

    # bf16 autocast for the network (the quantizer stays float32): the ids of model.encode under the same autocast
    run(tiny, tmp_path / "bf16", "--mixed_precision", "bf16", "--shard_size", "30", "--batch_size", "30")
    indices = [i for i in range(30) if i not in CORRUPT]
    expected = expected_tokens(tiny["model"], tiny["data"], indices, torch.autocast("cpu", dtype=torch.bfloat16))
    np.testing.assert_array_equal(np.asarray(load_tokens(tmp_path / "bf16")["token_ids"]), expected)


def test_push_to_hub_uploads_the_dataset_folder_without_network(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    uploads = []

    def fake_create_repo(self, repo_id, repo_type=None, **kwargs):
        assert repo_type == "dataset"
        return huggingface_hub.RepoUrl(f"https://huggingface.co/datasets/{repo_id}")

    def fake_upload_folder(self, *, repo_id, folder_path, repo_type=None, ignore_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        files = [os.path.relpath(os.path.join(d, f), folder_path) for d, _, fs in os.walk(folder_path) for f in fs]
        uploads.append({"repo_id": repo_id, "repo_type": repo_type,
                        "files": sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))})

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    summary = run(tiny, tmp_path / "out", "--shard_size", "15", "--push_to_hub", "--hub_dataset_id", "me/tokens")
    assert summary["hub_repo_id"] == "me/tokens"
    assert uploads == [{"repo_id": "me/tokens", "repo_type": "dataset",
                        "files": ["README.md", "data/train-00000-of-00002.parquet",
                                  "data/train-00001-of-00002.parquet"]}]


def test_image_folder_source_skips_unreadable_files(tiny, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    raw = source_images(tiny["data"])
    for name, index in (("a.png", 1), ("b.png", 2), ("d.png", 3)):
        (folder / name).write_bytes(raw[index])
    (folder / "c.png").write_bytes(b"not a png")
    summary = tokenize_dataset.main(["--model_name_or_path", tiny["model"], "--train_data_dir", str(folder),
                                     "--output_dir", str(tmp_path / "out"), "--disable_progress_bar"])
    assert summary["images"] == 3 and summary["skipped_images"] == 1
    tokens = load_tokens(tmp_path / "out")
    assert tokens["index"] == [0, 1, 3]  # c.png, row 2, is the unreadable one
    np.testing.assert_array_equal(np.asarray(tokens["token_ids"]), expected_tokens(tiny["model"], tiny["data"], [1, 2, 3]))


def test_bad_arguments_fail_clearly(tiny, tmp_path):
    with pytest.raises(ValueError, match="not a column"):
        run(tiny, tmp_path, "--keep_columns", "caption")
    with pytest.raises(SystemExit):
        tokenize_dataset.parse_args(["--model_name_or_path", "m", "--output_dir", "o"])  # no data
    assert tokenize_dataset.token_dtype(256) == "uint8" and tokenize_dataset.token_dtype(257) == "uint16"
    assert tokenize_dataset.token_dtype(16384) == "uint16" and tokenize_dataset.token_dtype(65537) == "uint32"
