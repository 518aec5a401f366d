#!/usr/bin/env python
"""Tokenize an image dataset with an OptVQ model: sharded parquet of token ids for training AR / masked priors.

    accelerate launch -m optvq_hf_examples.tokenize_dataset --model_name_or_path optvq-imagenet \
        --dataset_name ILSVRC/imagenet-1k --split train --keep_columns label --batch_size 256 \
        --mixed_precision bf16 --dataloader_num_workers 8 --output_dir imagenet-tokens [--augment ten_crop]

The data is read as `examples/run_train.py` reads it (`optvq_hf.training.load_image_dataset`: Hub id, local folder of
data files, `save_to_disk` folder, one file, `--train_data_dir` image folder, `--streaming`) and preprocessed by the
model's image processor (its saved `preprocessor_config.json`, or the one its config implies). The model is loaded by
`OptVQModel.from_pretrained` (native, diffusers or original-release layout; a folder or a Hub id) and assigns tokens
by nearest neighbour, so an image's ids never depend on the batch size or on the number of processes.

Output (`--output_dir`, the Hub's parquet layout, `datasets.load_dataset(output_dir)` reads it):

* `data/{split}-00000-of-0000N.parquet`: one row per image (per image and variant with `--augment`): `index` (the row's
  position in the source split), `token_ids` (the flat layout of docs/lm_tokenizer.md: position `(y, x)`, head `k` at
  `(y * w + x) * num_heads + k`, no special tokens, no offset; uint8 / uint16 / uint32, the smallest type holding the
  codebook), `variant` with `--augment`, and the `--keep_columns`;
* `README.md`: a dataset card whose metadata records the grid, heads, codebook size, tokenizer and per-split counts.

Shards of `--shard_size` source rows are written to a temporary file and renamed when complete: a restarted run skips
the finished shards (whatever its number of processes), a killed run never leaves a partial shard under its final
name. Unreadable images are skipped and counted (each shard records which). Processes take the unfinished shards in
turn (`accelerate launch --num_processes N` or `torchrun --nproc_per_node N`, CPU or GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import math
import os
import sys
import time

logger = logging.getLogger("tokenize_dataset")

AUGMENTATIONS = ("none", "flip", "ten_crop")
CROPS = ("center", "top_left", "top_right", "bottom_left", "bottom_right")
STATE_DIR = ".tokenize"  # run settings and temporary shards (hidden: not part of the dataset)
SHARD_METADATA_KEY = b"optvq_tokenize"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("tokenizer")
    model.add_argument("--model_name_or_path", required=True,
                       help="OptVQ model: a folder or Hub id in the native, diffusers or original-release layout.")
    model.add_argument("--revision", default=None, help="Hub revision of the model.")
    model.add_argument("--subfolder", default=None, help="Subfolder of the model (e.g. a pipeline's `vqvae`).")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", default=None,
                      help="Hub dataset id, a local folder (data files per split, or images), a save_to_disk folder, "
                           "or one parquet / arrow file.")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--train_data_dir", default=None, help="A folder of images (the imagefolder builder).")
    data.add_argument("--split", default="train")
    data.add_argument("--image_column", default=None, help="Image column (default: the first Image feature).")
    data.add_argument("--keep_columns", default=None,
                      help="Comma-separated columns copied to the output (labels, captions, ...).")
    data.add_argument("--max_samples", type=int, default=None, help="Tokenize the first N rows only.")
    data.add_argument("--streaming", action="store_true", help="Stream the dataset (no local copy).")
    data.add_argument("--cache_dir", default=None, help="datasets cache folder.")
    data.add_argument("--augment", choices=AUGMENTATIONS, default="none",
                      help="Extra variants per image, as LlamaGen extracts them: `flip` (center crop and its mirror), "
                           "`ten_crop` (5 crops of the image resized to crop_range x the crop size, and their "
                           "mirrors). One row per variant, with a `variant` column.")
    data.add_argument("--crop_range", type=float, default=1.1, help="`ten_crop`: resize factor before cropping.")
    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", required=True)
    run.add_argument("--shard_size", type=int, default=10000, help="Source rows per output shard.")
    run.add_argument("--batch_size", type=int, default=64, help="Images per forward pass (per process).")
    run.add_argument("--dataloader_num_workers", type=int, default=0,
                     help="Processes decoding images (map-style datasets; a stream is decoded in the main process).")
    run.add_argument("--mixed_precision", choices=("no", "bf16", "fp16"), default="no",
                     help="Autocast of the network; the quantizer computes in float32 whatever this is.")
    run.add_argument("--device", default=None, help="Default: the process's accelerator, else cpu.")
    run.add_argument("--num_threads", type=int, default=None, help="torch CPU threads per process.")
    run.add_argument("--overwrite_output_dir", action="store_true",
                     help="Delete this split's shards first (otherwise a run with the same settings resumes and "
                          "one with other settings is refused).")
    run.add_argument("--disable_progress_bar", action="store_true")
    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload the output folder as a Hub dataset.")
    hub.add_argument("--hub_dataset_id", default=None, help="Default: the output folder's name.")
    hub.add_argument("--hub_private", action="store_true")
    hub.add_argument("--hub_token", default=None)
    args = parser.parse_args(argv)
    if args.dataset_name is None and args.train_data_dir is None:
        parser.error("pass --dataset_name or --train_data_dir.")
    for name in ("shard_size", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.max_samples is not None and args.max_samples < 1:
        parser.error(f"--max_samples must be >= 1 when given, got {args.max_samples}.")
    if args.crop_range < 1:
        parser.error(f"--crop_range must be >= 1, got {args.crop_range}.")
    if args.dataloader_num_workers < 0:
        parser.error("--dataloader_num_workers must be >= 0.")
    args.keep_column_list = [c.strip() for c in (args.keep_columns or "").split(",") if c.strip()]
    return args


# --------------------------------------------------------------------------------------------------------------------
# Variants, token type, shard names
# --------------------------------------------------------------------------------------------------------------------
def variant_names(augment: str) -> list[str]:
    """The `variant` values of one image, in the order its rows are written (`[]`: no `variant` column)."""
    if augment == "flip":
        return ["center", "center_flip"]
    if augment == "ten_crop":
        return list(CROPS) + [f"{crop}_flip" for crop in CROPS]
    return []


def make_variants(images, augment: str, crop_size: int):
    """uint8 images `(N, C, S, S)` -> `(N * V, C, crop_size, crop_size)`, variants of an image consecutive."""
    import torch

    if augment == "none":
        return images
    if augment == "flip":
        return torch.stack([images, images.flip(-1)], dim=1).flatten(0, 1)
    side = images.shape[-1]
    far = side - crop_size
    corners = {"center": (far // 2, far // 2), "top_left": (0, 0), "top_right": (0, far), "bottom_left": (far, 0),
               "bottom_right": (far, far)}
    crops = [images[..., top:top + crop_size, left:left + crop_size] for top, left in (corners[c] for c in CROPS)]
    crops += [crop.flip(-1) for crop in crops]
    return torch.stack(crops, dim=1).flatten(0, 1)


def token_dtype(codebook_size: int) -> str:
    """The smallest unsigned integer type holding ids `0 .. codebook_size - 1`."""
    for name, bits in (("uint8", 8), ("uint16", 16), ("uint32", 32)):
        if codebook_size <= 2**bits:
            return name
    return "int64"


def shard_name(split: str, shard: int, num_shards: int | None) -> str:
    """The Hub's shard file name; without `-of-N` when the number of rows is unknown (an unbounded stream)."""
    return f"{split}-{shard:05d}-of-{num_shards:05d}.parquet" if num_shards else f"{split}-{shard:05d}.parquet"


def finished_shards(output_dir: str, split: str, num_shards: int | None) -> dict[int, str]:
    """`{shard: path}` of the complete shards of `split` (a shard file exists only once complete)."""
    found = {}
    for path in glob.glob(os.path.join(output_dir, "data", f"{split}-*.parquet")):
        name = os.path.basename(path)
        shard = name[len(split) + 1:].split("-")[0].split(".")[0]
        if shard.isdigit() and name == shard_name(split, int(shard), num_shards):
            found[int(shard)] = path
    return found


def shard_owner(shard: int, finished: set, world_size: int) -> int:
    """The process that writes an unfinished shard: unfinished shards are dealt out in turn, so a resumed run
    spreads what is left evenly whatever the number of processes of the earlier run."""
    return (shard - sum(1 for done in finished if done < shard)) % world_size


# --------------------------------------------------------------------------------------------------------------------
# Reading and decoding
# --------------------------------------------------------------------------------------------------------------------
class DecodedBatches:
    """Batches of source rows, decoded: item `k` is `{"shard", "last", "indices", "skipped", "images", "kept"}`,
    where `indices` are the rows whose image could be read, `images` their uint8 variants (`None` if none could),
    `skipped` the unreadable rows, `kept` the `--keep_columns` values of the read rows. A `torch` map-style dataset,
    so that DataLoader workers decode in parallel while the order stays that of the plan."""

    def __init__(self, dataset, plan, image_column, keep_columns, preprocessor, augment, crop_size):
        self.dataset, self.plan = dataset, plan
        self.image_column, self.keep_columns = image_column, keep_columns
        self.preprocessor, self.augment, self.crop_size = preprocessor, augment, crop_size

    def __len__(self):
        return len(self.plan)

    def __getitem__(self, item):
        shard, indices, last = self.plan[item]
        rows = self.dataset[list(indices)] if indices else {}
        return decode_rows(shard, last, list(indices), rows, self.image_column, self.keep_columns, self.preprocessor,
                           self.augment, self.crop_size)


def decode_rows(shard, last, indices, rows, image_column, keep_columns, preprocessor, augment, crop_size) -> dict:
    from optvq_hf.training import decode_images

    images, skipped_positions = decode_images(rows.get(image_column, []), preprocessor)
    skipped = set(skipped_positions)
    kept_positions = [p for p in range(len(indices)) if p not in skipped]
    if images is not None:
        images = make_variants(images, augment, crop_size)
    return {
        "shard": shard, "last": last,
        "indices": [indices[p] for p in kept_positions],
        "skipped": [indices[p] for p in skipped_positions],
        "images": images,
        "kept": {name: [rows[name][p] for p in kept_positions] for name in keep_columns},
    }


def map_style_batches(dataset, my_shards, shard_size, num_rows, batch_size, num_workers, pin_memory=False, **decode):
    """Decoded batches of the shards `my_shards` of a map-style dataset (DataLoader workers decode)."""
    import torch

    plan = []
    for shard in my_shards:
        rows = range(shard * shard_size, min((shard + 1) * shard_size, num_rows))
        starts = list(range(rows.start, rows.stop, batch_size)) or [rows.start]
        for start in starts:
            stop = min(start + batch_size, rows.stop)
            plan.append((shard, range(start, stop), stop == rows.stop))
    loader = torch.utils.data.DataLoader(DecodedBatches(dataset, plan, **decode), batch_size=None,
                                         num_workers=num_workers, pin_memory=pin_memory)
    yield from loader


def streamed_batches(dataset, is_mine, shard_size, batch_size, max_rows, **decode):
    """Decoded batches of a stream, read in order on every process: the rows of other processes' and finished
    shards are passed over undecoded."""
    columns = [decode["image_column"], *decode["keep_columns"]]
    pending_shard, indices, rows = None, [], {name: [] for name in columns}

    def flush(last):
        batch = decode_rows(pending_shard, last, list(indices), rows, **decode)
        indices.clear()
        for values in rows.values():
            values.clear()
        return batch

    for index, row in enumerate(dataset):
        if max_rows is not None and index >= max_rows:
            break
        shard = index // shard_size
        if pending_shard is not None and shard != pending_shard:
            yield flush(last=True)
            pending_shard = None
        if not is_mine(shard):
            continue
        pending_shard = shard
        indices.append(index)
        for name in columns:
            rows[name].append(row[name])
        if len(indices) == batch_size and (index + 1) % shard_size:
            yield flush(last=False)
    if pending_shard is not None:
        yield flush(last=True)


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------
def write_shard(path: str, temporary_dir: str, columns: dict, features, metadata: dict):
    """Write one shard to a temporary file (flushed to disk), then rename it to `path` in one step. `columns` holds
    `token_ids` as one `(rows, sequence_length)` array (stored as arrow's fixed-size lists without a per-row copy)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = dict(columns)
    tokens = columns.pop("token_ids")
    token_array = pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), tokens.shape[1])
    other_features = None if features is None else datasets.Features(
        {name: feature for name, feature in features.items() if name != "token_ids"})
    table = datasets.Dataset.from_dict(columns, features=other_features).data.table
    position = 2 if "variant" in columns else 1
    table = table.add_column(position, "token_ids", token_array)
    if features is None:
        features = datasets.Features.from_arrow_schema(table.schema)
    table = table.cast(features.arrow_schema)
    schema_metadata = dict(table.schema.metadata or {})
    schema_metadata[SHARD_METADATA_KEY] = json.dumps(metadata).encode()
    table = table.replace_schema_metadata(schema_metadata)
    temporary = os.path.join(temporary_dir, f"{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        pq.write_table(table, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_shard_metadata(path: str) -> dict:
    import pyarrow.parquet as pq

    return json.loads(pq.read_schema(path).metadata[SHARD_METADATA_KEY])


def output_features(source_features, keep_columns, augment, dtype, sequence_length):
    import datasets

    features = {"index": datasets.Value("int64")}
    if augment != "none":
        features["variant"] = datasets.Value("string")
    features["token_ids"] = datasets.List(datasets.Value(dtype), length=sequence_length)
    for name in keep_columns:
        feature = source_features.get(name) if source_features is not None else None
        if feature is None:
            return None  # let datasets infer the types (a stream without known features)
        features[name] = feature
    return datasets.Features(features)


# --------------------------------------------------------------------------------------------------------------------
# Dataset card
# --------------------------------------------------------------------------------------------------------------------
def write_dataset_card(output_dir: str, layout: dict):
    """`README.md` covering every tokenized split of the folder: the loading configuration, and under `optvq` the
    token layout, the tokenizer and each split's counts."""
    from huggingface_hub import DatasetCard, DatasetCardData

    splits = {}
    for path in sorted(glob.glob(os.path.join(output_dir, STATE_DIR, "*.json"))):
        with open(path) as handle:
            state = json.load(handle)
        if state.get("complete"):
            splits[state["settings"]["split"]] = state
    data_files = [{"split": split, "path": f"data/{split}-*"} for split in splits]
    metadata = dict(layout)
    metadata["splits"] = {split: {key: state[key] for key in ("num_rows", "num_images", "skipped_images",
                                                                "num_shards", "source")}
                          for split, state in splits.items()}
    data = DatasetCardData(configs=[{"config_name": "default", "data_files": data_files}],
                           tags=["optvq", "image-tokens", "vector-quantization"], optvq=metadata)
    rows = "\n".join(f"| {split} | {s['num_rows']} | {s['num_images']} | {s['skipped_images']} | "
                     f"`{s['source']['dataset']}` ({s['source']['split']}) |" for split, s in splits.items())
    grid = metadata["grid_size"]
    columns = ", ".join(["`index` (the image's position in the source split)", "`token_ids`"]
                        + (["`variant` (" + ", ".join(metadata["variants"]) + ")"] if metadata["variants"] else [])
                        + [f"`{name}`" for name in metadata["kept_columns"]])
    text = f"""---
{data.to_yaml()}
---

# OptVQ token ids

Images tokenized by the OptVQ tokenizer `{metadata['tokenizer']}` with `examples/tokenize_dataset.py` of optvq-hf
(nearest-neighbour assignment).

| split | rows | images | unreadable images skipped | source |
|---|---|---|---|---|
{rows}

Each row: {columns}. `token_ids` holds {metadata['sequence_length']} ids ({metadata['token_dtype']}, codes
`0 .. {metadata['codebook_size'] - 1}`): a {grid[0]}x{grid[1]} grid with {metadata['num_heads']} head(s) per position,
in raster order with heads innermost: head `k` of position `(y, x)` is
`token_ids[(y * {grid[1]} + x) * {metadata['num_heads']} + k]`. No special tokens, no offset.

```py
import numpy as np
import torch
from datasets import load_dataset
from optvq_hf import OptVQModel

tokens = load_dataset("parquet", data_dir="<this folder>/data")  # or load_dataset("<this folder or repo>")
model = OptVQModel.from_pretrained("{metadata['tokenizer']}")
ids = torch.from_numpy(np.asarray(tokens["{next(iter(splits), 'train')}"][:4]["token_ids"], dtype=np.int64))
images = model.decode_tokens(model.sequence_to_tokens(ids, grid_size=({grid[0]}, {grid[1]})))
```
"""
    DatasetCard(text).save(os.path.join(output_dir, "README.md"))


def push_dataset_to_hub(output_dir: str, repo_id: str, private: bool, token: str | None) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=output_dir,
                      commit_message="Upload OptVQ token ids", ignore_patterns=[f"{STATE_DIR}/**"])
    return repo_id


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------
def main(args=None) -> dict:
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    import datasets
    import torch
    from tqdm.auto import tqdm

    from optvq_hf import ImageSequenceLayout, OptVQImageProcessor, OptVQModel
    from optvq_hf.training import (
        ImagePreprocessor,
        distributed_state,
        find_image_column,
        load_image_dataset,
        set_cpu_threads,
        to_pixel_values,
    )

    state = distributed_state()
    world_size, rank = state.num_processes, state.process_index
    set_cpu_threads(args.num_threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    device = torch.device(args.device) if args.device else state.device

    hub_kwargs = {key: value for key, value in (("revision", args.revision), ("subfolder", args.subfolder)) if value}
    model = OptVQModel.from_pretrained(args.model_name_or_path, **hub_kwargs).to(device).eval()
    model.quantizer.inference_assignment = "nearest"  # an image's ids do not depend on its batch
    config = model.config
    processor = OptVQImageProcessor.from_pretrained_or_model_config(args.model_name_or_path, config, **hub_kwargs)
    crop = processor.crop_size
    if args.augment == "ten_crop":
        if crop["height"] != crop["width"]:
            raise ValueError(f"--augment ten_crop needs a square crop size, got {crop}.")
        preprocessor = ImagePreprocessor(processor, resolution=int(round(crop["height"] * args.crop_range)),
                                         center_crop=True)
    else:  # the processor's own resize and center crop
        preprocessor = ImagePreprocessor(processor)
    grid = (crop["height"] // config.downsample_factor, crop["width"] // config.downsample_factor)
    layout = ImageSequenceLayout.from_config(config)
    sequence_length = layout.sequence_length(grid)
    dtype = token_dtype(config.codebook_size)
    variants = variant_names(args.augment)

    dataset = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir,
                                 streaming=args.streaming, cache_dir=args.cache_dir, split=args.split)
    image_column = find_image_column(dataset.features, args.image_column)
    source_columns = list(dataset.features) if dataset.features is not None else None
    for name in args.keep_column_list:
        if source_columns is not None and name not in source_columns:
            raise ValueError(f"--keep_columns: {name!r} is not a column of the dataset; columns: {source_columns}.")
    columns = [image_column] + [c for c in args.keep_column_list if c != image_column]
    streaming = isinstance(dataset, datasets.IterableDataset)
    if streaming:
        num_rows = args.max_samples  # None: read to the end
    else:
        num_rows = len(dataset) if args.max_samples is None else min(args.max_samples, len(dataset))
    if dataset.features is not None and isinstance(dataset.features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))  # decoded (and counted) by us
    dataset = dataset.select_columns(columns)
    num_shards = math.ceil(num_rows / args.shard_size) if num_rows is not None else None
    if num_shards == 0:
        raise ValueError(f"The {args.split!r} split has no rows.")
    features = output_features(dataset.features, args.keep_column_list, args.augment, dtype, sequence_length)

    settings = dict(
        model=args.model_name_or_path, revision=args.revision, subfolder=args.subfolder,
        dataset=args.dataset_name or args.train_data_dir, dataset_config=args.dataset_config_name, split=args.split,
        image_column=image_column, keep_columns=args.keep_column_list, max_samples=args.max_samples,
        streaming=streaming, num_source_rows=num_rows, shard_size=args.shard_size, augment=args.augment,
        crop_range=args.crop_range if args.augment == "ten_crop" else None, image_size=[crop["height"], crop["width"]],
        grid_size=list(grid), num_heads=config.num_heads, codebook_size=config.codebook_size, token_dtype=dtype,
    )
    data_dir = os.path.join(args.output_dir, "data")
    state_dir = os.path.join(args.output_dir, STATE_DIR)
    temporary_dir = os.path.join(state_dir, "tmp")
    state_file = os.path.join(state_dir, f"{args.split}.json")
    if os.path.isfile(state_file) and not args.overwrite_output_dir:  # every process checks, so that all stop
        with open(state_file) as handle:
            previous = json.load(handle)["settings"]
        changed = {key: (previous.get(key), value) for key, value in settings.items() if previous.get(key) != value}
        if changed:
            raise ValueError(f"{args.output_dir} holds a {args.split!r} split tokenized with other settings "
                             f"(earlier vs now: {changed}); pass --overwrite_output_dir or another --output_dir.")
    state.wait_for_everyone()
    if state.is_main_process:
        if args.overwrite_output_dir:
            for path in glob.glob(os.path.join(data_dir, f"{args.split}-*.parquet")) + [state_file]:
                if os.path.exists(path):
                    os.remove(path)
        os.makedirs(data_dir, exist_ok=True)
        os.makedirs(temporary_dir, exist_ok=True)
        if not os.path.isfile(state_file):
            _write_json(state_file, {"settings": settings, "complete": False})
        for stale in glob.glob(os.path.join(temporary_dir, f"{args.split}-*.tmp")):
            os.remove(stale)  # left by a killed run
    state.wait_for_everyone()
    finished = set(finished_shards(args.output_dir, args.split, num_shards))
    state.wait_for_everyone()  # everyone has listed the finished shards before anyone adds one

    def is_mine(shard):
        return shard not in finished and shard_owner(shard, finished, world_size) == rank

    decode = dict(image_column=image_column, keep_columns=args.keep_column_list, preprocessor=preprocessor,
                  augment=args.augment, crop_size=crop["height"])
    if streaming:
        if args.dataloader_num_workers:
            logger.info("A stream is decoded in the main process (--dataloader_num_workers applies to map-style data).")
        batches = streamed_batches(dataset, is_mine, args.shard_size, args.batch_size, num_rows, **decode)
        my_rows = None
    else:
        my_shards = [shard for shard in range(num_shards) if is_mine(shard)]
        batches = map_style_batches(dataset, my_shards, args.shard_size, num_rows, args.batch_size,
                                    args.dataloader_num_workers, pin_memory=device.type == "cuda", **decode)
        my_rows = sum(min((s + 1) * args.shard_size, num_rows) - s * args.shard_size for s in my_shards)
    if state.is_main_process:
        logger.info("%s: %s rows in %s shards of %d (%d finished earlier); %d process(es); tokens %dx%dx%d (%d ids, %s)",
                    args.split, num_rows if num_rows is not None else "?", num_shards or "?", args.shard_size,
                    len(finished), world_size, grid[0], grid[1], config.num_heads, sequence_length, dtype)

    autocast = torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision],
                              enabled=True) if args.mixed_precision != "no" else contextlib.nullcontext()
    progress = tqdm(total=my_rows, unit="img", desc=f"tokenizing ({world_size} process(es))",
                    disable=args.disable_progress_bar or not state.is_main_process, dynamic_ncols=True)
    counts = {"images": 0, "skipped": 0, "rows": 0, "shards": 0}
    pending = None
    started = time.perf_counter()
    for batch in batches:
        if pending is None:
            pending = {"shard": batch["shard"], "indices": [], "tokens": [], "skipped": [],
                       "kept": {name: [] for name in args.keep_column_list}, "started": time.perf_counter()}
        pending["skipped"] += batch["skipped"]
        if batch["images"] is not None:
            pixel_values = to_pixel_values(batch["images"].to(device, non_blocking=True))  # uint8 travels
            with torch.inference_mode(), autocast:
                token_ids = model.encode(pixel_values).token_ids
            pending["tokens"].append(layout.tokens_to_sequence(token_ids).cpu().numpy().astype(dtype))
            pending["indices"] += batch["indices"]
            for name, values in batch["kept"].items():
                pending["kept"][name] += values
        progress.update(len(batch["indices"]) + len(batch["skipped"]))
        counts["images"] += len(batch["indices"])
        counts["skipped"] += len(batch["skipped"])
        progress.set_postfix(skipped=counts["skipped"], refresh=False)
        if batch["last"]:
            counts["rows"] += _finish_shard(pending, args, variants, features, data_dir, temporary_dir, num_shards,
                                            rank, sequence_length, dtype)
            counts["shards"] += 1
            pending = None
    progress.close()
    seconds = time.perf_counter() - started

    totals = torch.tensor([counts["images"], counts["skipped"], counts["rows"], counts["shards"]],
                          dtype=torch.float64, device=state.device if world_size > 1 else "cpu")
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(totals)
    images, skipped, rows, shards = (int(value) for value in totals.cpu().tolist())
    state.wait_for_everyone()
    summary = {
        "split": args.split, "num_processes": world_size, "images": images, "skipped_images": skipped,
        "rows_written": rows, "shards_written": shards, "shards_resumed": len(finished),
        "tokens": rows * sequence_length, "seconds": round(seconds, 3),
        "images_per_second": round(images / seconds, 2) if seconds > 0 else None,
    }
    if not state.is_main_process:
        return summary

    done = finished_shards(args.output_dir, args.split, num_shards)
    if num_shards is not None and len(done) != num_shards:
        missing = sorted(set(range(num_shards)) - set(done))
        raise RuntimeError(f"Shards {missing[:10]} of {args.split!r} were not written.")
    if num_shards is None and done and sorted(done) != list(range(len(done))):
        raise RuntimeError(f"Shards of {args.split!r} are missing: found {sorted(done)}.")
    shard_metadata = [read_shard_metadata(done[shard]) for shard in sorted(done)]
    split_state = {
        "settings": settings, "complete": True,
        "num_rows": sum(m["rows"] for m in shard_metadata),
        "num_images": sum(m["images"] for m in shard_metadata),
        "skipped_images": sum(m["skipped"] for m in shard_metadata),
        "num_shards": len(shard_metadata),
        "source": {"dataset": settings["dataset"], "config": args.dataset_config_name, "split": args.split},
    }
    _write_json(state_file, split_state)
    write_dataset_card(args.output_dir, {
        "tokenizer": args.model_name_or_path + (f"/{args.subfolder}" if args.subfolder else ""),
        "tokenizer_revision": args.revision, "quantizer_type": config.quantizer_type,
        "inference_assignment": "nearest", "image_size": settings["image_size"], "in_channels": config.in_channels,
        "grid_size": list(grid), "num_heads": config.num_heads, "codebook_size": config.codebook_size,
        "sequence_length": sequence_length, "token_dtype": dtype,
        "layout": "raster order, heads innermost: token_ids[(y * w + x) * num_heads + k]; no special tokens or offset",
        "augment": args.augment, "variants": variants, "kept_columns": args.keep_column_list,
    })
    summary.update(num_rows=split_state["num_rows"], num_images=split_state["num_images"],
                   skipped_images_total=split_state["skipped_images"], num_shards=split_state["num_shards"],
                   output_dir=args.output_dir)
    if args.push_to_hub:
        repo_id = args.hub_dataset_id or os.path.basename(os.path.abspath(args.output_dir))
        summary["hub_repo_id"] = push_dataset_to_hub(args.output_dir, repo_id, args.hub_private, args.hub_token)
    logger.info("Summary: %d images tokenized (%d unreadable, skipped), %d rows and %d tokens written in %d shard(s) "
                "(%d finished earlier), %.1f images/s, %.1f s. The split has %d rows in %s.",
                images, skipped, rows, rows * sequence_length, shards, len(finished),
                summary["images_per_second"] or 0.0, seconds, split_state["num_rows"], data_dir)
    return summary


def _write_json(path: str, value: dict):
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as handle:
        json.dump(value, handle, indent=2)
    os.replace(temporary, path)


def _finish_shard(pending, args, variants, features, data_dir, temporary_dir, num_shards, rank, sequence_length,
                  dtype) -> int:
    """Write a complete shard; returns its number of rows."""
    import numpy as np

    shard = pending["shard"]
    repeat = max(1, len(variants))
    tokens = (np.concatenate(pending["tokens"]) if pending["tokens"]
              else np.zeros((0, sequence_length), dtype=dtype))
    columns = {"index": [i for i in pending["indices"] for _ in range(repeat)]}
    if variants:
        columns["variant"] = variants * len(pending["indices"])
    columns["token_ids"] = tokens
    for name, values in pending["kept"].items():
        columns[name] = [value for value in values for _ in range(repeat)]
    first = shard * args.shard_size
    metadata = {"shard": shard, "rows_from": first,
                "rows_to": first + len(pending["indices"]) + len(pending["skipped"]),
                "rows": len(columns["index"]), "images": len(pending["indices"]), "skipped": len(pending["skipped"]),
                "skipped_indices": sorted(pending["skipped"]), "process_index": rank,
                "seconds": round(time.perf_counter() - pending["started"], 3)}
    write_shard(os.path.join(data_dir, shard_name(args.split, shard, num_shards)), temporary_dir, columns, features,
                metadata)
    return metadata["rows"]


def cli():
    """The console command `optvq-tokenize`: `main()`, whose summary is not returned (a console command exits with
    the return value of its function)."""
    main()


if __name__ == "__main__":
    main()
    sys.exit(0)
