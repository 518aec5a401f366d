#!/usr/bin/env python
"""Train an OptVQ image tokenizer with 🤗 Accelerate on a 🤗 `datasets` dataset.

Runs on one CPU or GPU, or on many processes / GPUs / nodes with `accelerate launch`:

    python examples/run_train.py --output_dir demo-output                        # bundled demo data, no network
    accelerate launch examples/run_train.py \
        --model_config_name_or_path optvq-mnist --dataset_name ylecun/mnist \
        --validation_split test --train_batch_size 128 --max_train_steps 600 --output_dir optvq-mnist

The recipe is the original OptVQ one: L1 + L2 (+ LPIPS) + quantization loss (+ hinge PatchGAN with the VQGAN adaptive
weight after `--disc_start`), AdamW with the original parameter groups, learning rate scaled by the total batch,
OneCycle schedule with 1% warm-up, gradient clipping at 1.0. See docs/training.md.

The script is importable: `main(args=None)` (a list of arguments or a namespace from `parse_args`) returns the final
metrics, which are also written to `output_dir/metrics.json`.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings

# Idle OpenMP threads sleep instead of spinning: on a busy or oversubscribed CPU (several processes, shared cores)
# spinning threads made a CPU step up to 8x slower in our measurements. Only effective before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

logger = logging.getLogger("optvq_hf.run_train")

DEFAULT_MODEL = "optvq-cifar10"


# --------------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments (`argv=None` reads `sys.argv`)."""
    parser = argparse.ArgumentParser(description="Train an OptVQ image tokenizer (Accelerate + datasets).")
    bool_flag = argparse.BooleanOptionalAction

    group = parser.add_argument_group("model")
    group.add_argument("--model_config_name_or_path", type=str, default=DEFAULT_MODEL,
                       help="A preset name (e.g. optvq-mnist, optvq-imagenet-16x16x4), a config.json file, or a "
                            "pretrained model folder / Hub id to fine-tune.")
    group.add_argument("--config_overrides", type=str, default=None,
                       help="Comma-separated config fields to override, e.g. 'quantizer_type=vq,num_heads=1'.")
    group.add_argument("--resolution", type=int, default=None,
                       help="Training image size (default: the config's `resolution`).")

    group = parser.add_argument_group("data")
    group.add_argument("--dataset_name", type=str, default=None,
                       help="Hub dataset id, local data folder / file, or save_to_disk folder. Without it and without "
                            "--train_data_dir, a bundled demo dataset (crops of scikit-image photos) is used.")
    group.add_argument("--dataset_config_name", type=str, default=None, help="The dataset's configuration name.")
    group.add_argument("--train_data_dir", type=str, default=None, help="A folder of images (imagefolder).")
    group.add_argument("--image_column", type=str, default=None, help="Column with the images (auto-detected).")
    group.add_argument("--train_split", type=str, default="train", help="Split to train on.")
    group.add_argument("--validation_split", type=str, default=None,
                       help="Split to evaluate on (default: 'validation' or 'test' if present, else a held-out "
                            "--validation_split_percentage of the training split).")
    group.add_argument("--validation_split_percentage", type=float, default=1.0,
                       help="Percent of the training split held out when the dataset has no validation split.")
    group.add_argument("--max_train_samples", type=int, default=None, help="Truncate the training set.")
    group.add_argument("--max_eval_samples", type=int, default=2000, help="Truncate the evaluation set.")
    group.add_argument("--streaming", action="store_true", help="Stream the dataset (no local copy).")
    group.add_argument("--shuffle_buffer_size", type=int, default=10_000, help="Shuffle buffer when streaming.")
    group.add_argument("--cache_dir", type=str, default=None, help="datasets cache folder.")
    group.add_argument("--cache_preprocessed", choices=("auto", "always", "never"), default="auto",
                       help="Decode and resize every image once with datasets.map (auto: for map-style datasets "
                            "whose resized images fit in 64 GB).")
    group.add_argument("--preprocessing_num_workers", type=int, default=None, help="Processes for datasets.map.")
    group.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    group.add_argument("--random_crop", action=bool_flag, default=True,
                       help="Random (vs center) crops after resizing the shortest edge to --resolution.")
    group.add_argument("--random_flip", action=bool_flag, default=False, help="Random horizontal flips.")
    group.add_argument("--demo_num_images", type=int, default=3000, help="Training images of the demo dataset.")

    group = parser.add_argument_group("optimization")
    group.add_argument("--train_batch_size", type=int, default=128, help="Batch size per device.")
    group.add_argument("--eval_batch_size", type=int, default=256, help="Evaluation batch size per device.")
    group.add_argument("--num_train_epochs", type=int, default=1)
    group.add_argument("--max_train_steps", type=int, default=None,
                       help="Optimizer steps in total (overrides --num_train_epochs).")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--learning_rate", type=float, default=4.5e-6,
                       help="Base learning rate (multiplied by the total batch size with --scale_lr).")
    group.add_argument("--scale_lr", action=bool_flag, default=True,
                       help="lr = learning_rate x batch per device x processes x accumulation (the original recipe).")
    group.add_argument("--codebook_lr_multiplier", type=float, default=1.0, help="LR factor of the quantizer.")
    group.add_argument("--weight_decay", type=float, default=0.05, help="AdamW decay of conv/linear weights.")
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_epsilon", type=float, default=1e-7)
    group.add_argument("--lr_scheduler", type=str, default="onecycle",
                       help="onecycle (original), constant, constant_with_warmup, linear, cosine, "
                            "cosine_with_restarts, polynomial.")
    group.add_argument("--lr_warmup_steps", type=int, default=None, help="Warm-up steps (default: 1%% of steps).")
    group.add_argument("--lr_warmup_ratio", type=float, default=0.01)
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping (0 disables).")
    group.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                       help="Autocast precision (default: accelerate config). The quantizer and losses stay fp32.")
    group.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights and save it.")
    group.add_argument("--ema_decay", type=float, default=0.999)
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--num_threads", type=int, default=None,
                       help="torch CPU threads per process (default: CPU cores / local processes).")

    group = parser.add_argument_group("loss")
    group.add_argument("--l1_weight", type=float, default=1.0)
    group.add_argument("--l2_weight", type=float, default=1.0)
    group.add_argument("--perceptual_weight", type=float, default=0.0,
                       help="LPIPS weight (3.0 in the original ImageNet recipe); 0 loads no network.")
    group.add_argument("--perceptual_model", type=str, default=None,
                       help="LPIPS-VGG weights: a .safetensors file, a folder with lpips_vgg.safetensors, or a Hub id.")
    group.add_argument("--quantization_weight", type=float, default=1.0)
    group.add_argument("--gan_weight", type=float, default=0.0,
                       help="Generator loss weight (1.0 in the original ImageNet recipe); 0 trains no discriminator.")
    group.add_argument("--disc_weight", type=float, default=1.0)
    group.add_argument("--disc_start", type=int, default=0, help="Optimizer step at which the GAN terms start.")
    group.add_argument("--disc_num_layers", type=int, default=3)
    group.add_argument("--disc_base_channels", type=int, default=64)
    group.add_argument("--disc_loss", choices=("hinge", "vanilla"), default="hinge")
    group.add_argument("--disc_learning_rate", type=float, default=None,
                       help="Base LR of the discriminator (default: --learning_rate), scaled like it.")

    group = parser.add_argument_group("codebook initialization")
    group.add_argument("--codebook_init", choices=("none", "kmeans", "random"), default="none",
                       help="Initialize the codebook from encoder features of a first pass over the data.")
    group.add_argument("--codebook_init_batches", type=int, default=8, help="Batches per process for the first pass.")
    group.add_argument("--codebook_init_iters", type=int, default=30, help="k-means iterations.")

    group = parser.add_argument_group("outputs")
    group.add_argument("--output_dir", type=str, default="optvq-output")
    group.add_argument("--checkpointing_steps", type=int, default=None, help="Save the training state every N steps.")
    group.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most N checkpoints.")
    group.add_argument("--resume_from_checkpoint", type=str, default=None, help="'latest' or a checkpoint folder.")
    group.add_argument("--stop_after_steps", type=int, default=None,
                       help="Stop this run after N optimizer steps, save a checkpoint and exit without the final "
                            "model (for time-limited jobs; resume with --resume_from_checkpoint latest).")
    group.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, all or none.")
    group.add_argument("--tracker_project_name", type=str, default="optvq")
    group.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to output_dir.")
    group.add_argument("--logging_steps", type=int, default=10, help="Log scalars every N steps.")
    group.add_argument("--validation_steps", type=int, default=None,
                       help="Every N steps evaluate and save a reconstruction grid and a code-usage histogram.")
    group.add_argument("--num_validation_images", type=int, default=8, help="Images in the reconstruction grid.")
    group.add_argument("--validation_images", type=str, nargs="*", default=None,
                       help="Your own image files to show in the reconstruction grids.")
    group.add_argument("--skip_final_eval", action="store_true", help="Do not evaluate at the end.")
    group.add_argument("--fail_on_collapse", action="store_true",
                       help="Exit with status 3 when the final evaluation finds a collapsed (dead) model; it is always "
                            "reported in the log, the summary and metrics.json (`collapsed`).")
    group.add_argument("--push_to_hub", action="store_true", help="Upload the final model to the Hub.")
    group.add_argument("--hub_model_id", type=str, default=None, help="Hub repository (default: output_dir name).")
    group.add_argument("--hub_token", type=str, default=None)
    group.add_argument("--hub_private_repo", action="store_true")
    args = parser.parse_args(argv)
    _check_args(args)
    return args


def _check_args(args: argparse.Namespace):
    positive = ("train_batch_size", "eval_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                "logging_steps", "codebook_init_batches")
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {getattr(args, name)}.")
    for name in ("max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "validation_steps",
                 "stop_after_steps", "max_train_samples", "max_eval_samples", "resolution"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"`--{name}` must be >= 1 when given, got {value}.")
    if args.learning_rate <= 0:
        raise ValueError(f"`--learning_rate` must be positive, got {args.learning_rate}.")
    if args.streaming and args.max_train_steps is None:
        raise ValueError("`--streaming` datasets have no length: pass `--max_train_steps`.")
    if args.perceptual_weight > 0 and not args.perceptual_model:
        raise ValueError("`--perceptual_weight` > 0 needs `--perceptual_model` (LPIPS weights: file, folder or Hub id).")


def parse_config_overrides(text: str | None) -> dict:
    """'a=1,b=vq,c=[1,2]' -> {'a': 1, 'b': 'vq', 'c': [1, 2]} (values parsed as Python literals when possible)."""
    if not text:
        return {}
    overrides, depth, current = {}, 0, ""
    parts = []
    for char in text:  # split on commas that are not inside brackets
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    for part in parts:
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"`--config_overrides` entries must look like key=value, got {part!r}.")
        key, value = part.split("=", 1)
        key, value = key.strip(), value.strip()
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = {"true": True, "false": False, "none": None}.get(value.lower(), value)
    return overrides


# --------------------------------------------------------------------------------------------------------------------
# Model, processor and data
# --------------------------------------------------------------------------------------------------------------------
def load_model_and_processor(args):
    """The model (new from a preset / config, or pretrained) and its image processor."""
    from optvq_hf import OptVQConfig, OptVQImageProcessor, OptVQModel
    from optvq_hf.configuration_optvq import PRESETS

    name = args.model_config_name_or_path
    overrides = parse_config_overrides(args.config_overrides)
    processor = None
    if name in PRESETS:
        config = OptVQConfig.from_preset(name, **overrides)
        model = OptVQModel(config)
    elif os.path.isfile(name):
        config_dict = OptVQConfig.get_config_dict(name)[0]
        config = OptVQConfig.from_dict({**config_dict, **overrides})
        model = OptVQModel(config)
    elif os.path.isdir(name) and not any(
        os.path.exists(os.path.join(name, f)) for f in ("model.safetensors", "model.safetensors.index.json")
    ):
        config = OptVQConfig.from_pretrained(name, **overrides)
        model = OptVQModel(config)
    else:  # a pretrained folder or Hub id: fine-tune
        model = OptVQModel.from_pretrained(name, **overrides)
        config = model.config
        try:
            processor = OptVQImageProcessor.from_pretrained(name)
        except (OSError, ValueError):
            processor = None
    if processor is None:
        processor = OptVQImageProcessor.from_model_config(config)
    resolution = args.resolution or config.resolution
    if resolution % config.downsample_factor:
        raise ValueError(f"`--resolution` ({resolution}) must be divisible by the downsampling factor "
                         f"{config.downsample_factor}.")
    processor.size = {"shortest_edge": resolution}
    processor.crop_size = {"height": resolution, "width": resolution}
    return model, processor, resolution


def _pick_eval_split(splits, args) -> str | None:
    if args.validation_split is not None:
        if args.validation_split not in splits:
            raise ValueError(f"`--validation_split` {args.validation_split!r} not in the dataset's splits {splits}.")
        return args.validation_split
    for candidate in ("validation", "valid", "val", "test"):
        if candidate in splits and candidate != args.train_split:
            return candidate
    return None


def build_data(args, accelerator, processor, resolution):
    """Training DataLoader (prepared unless streaming), evaluation images (uint8, on CPU) and a description."""
    import datasets
    import numpy as np
    from datasets.distributed import split_dataset_by_node

    from optvq_hf.training import (
        CachedImageDataset,
        ImagePreprocessor,
        OnTheFlyImageDataset,
        StreamingImageDataset,
        build_demo_dataset,
        cache_preprocessed,
        collate_images,
        find_image_column,
        load_image_dataset,
    )

    if args.dataset_name is None and args.train_data_dir is None:
        with accelerator.main_process_first():
            raw = build_demo_dataset(num_train=args.demo_num_images, num_test=max(64, args.num_validation_images),
                                     resolution=resolution, seed=0)
        description = "demo (random crops of scikit-image's bundled photos)"
        streaming = False
    else:
        with accelerator.main_process_first():
            raw = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir,
                                     streaming=args.streaming, cache_dir=args.cache_dir, token=args.hub_token)
        description = args.dataset_name or args.train_data_dir
        streaming = args.streaming
    splits = list(raw.keys())
    if args.train_split not in splits:
        raise ValueError(f"`--train_split` {args.train_split!r} not in the dataset's splits {splits}.")
    train = raw[args.train_split]
    image_column = find_image_column(train.features, args.image_column)
    eval_split = _pick_eval_split(splits, args)
    train_pre = ImagePreprocessor(processor, resolution, center_crop=False)
    eval_pre = ImagePreprocessor(processor, resolution, center_crop=True)
    max_eval = args.max_eval_samples

    # ---- evaluation images: a small set, decoded once into memory
    if streaming:
        if eval_split is not None:
            eval_source = raw[eval_split].take(max_eval)
        else:
            eval_source = train.take(max_eval)
            train = train.skip(max_eval)
        eval_rows = [row[image_column] for row in eval_source]
    else:
        if eval_split is not None:
            eval_set = raw[eval_split]
        else:
            held = max(1, int(round(len(train) * args.validation_split_percentage / 100)))
            split = train.train_test_split(test_size=held, seed=args.seed, shuffle=True)
            train, eval_set = split["train"], split["test"]
        eval_set = eval_set.select(range(min(max_eval, len(eval_set))))
        eval_set = eval_set.cast_column(image_column, datasets.Image(decode=False)) if isinstance(
            eval_set.features.get(image_column), datasets.Image) else eval_set
        eval_rows = eval_set[image_column]
    eval_arrays = [eval_pre(value) for value in eval_rows]
    eval_skipped = sum(array is None for array in eval_arrays)
    eval_arrays = [array for array in eval_arrays if array is not None]
    if not eval_arrays:
        raise ValueError("No readable image in the evaluation set.")
    eval_images = torch.from_numpy(np.stack(eval_arrays))

    # ---- training data
    skipped = 0
    if streaming:
        train = train.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
        if accelerator.num_processes > 1:
            train = split_dataset_by_node(train, rank=accelerator.process_index, world_size=accelerator.num_processes)
        dataset = StreamingImageDataset(train, image_column, train_pre)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, collate_fn=collate_images,
                                             num_workers=args.dataloader_num_workers, drop_last=True)
        return loader, eval_images, description, {"skipped_train": 0, "skipped_eval": eval_skipped,
                                                  "train_size": None, "streaming": True}
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    cache = args.cache_preprocessed
    if cache == "auto":
        channels = processor.num_channels
        cache = "always" if len(train) * channels * resolution * resolution * 1.5 < 64e9 else "never"
    if cache == "always":
        with accelerator.main_process_first():
            processed, skipped = cache_preprocessed(train, image_column, train_pre,
                                                    num_proc=args.preprocessing_num_workers)
        dataset = CachedImageDataset.maybe_in_memory(processed)
    else:
        dataset = OnTheFlyImageDataset(train, image_column, train_pre)
    if len(dataset) < args.train_batch_size * accelerator.num_processes:
        raise ValueError(f"The training set has {len(dataset)} readable images, fewer than one global batch "
                         f"({args.train_batch_size} x {accelerator.num_processes} processes).")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True, drop_last=True,
                                         collate_fn=collate_images, num_workers=args.dataloader_num_workers,
                                         persistent_workers=args.dataloader_num_workers > 0)
    loader = accelerator.prepare(loader)
    return loader, eval_images, description, {"skipped_train": skipped, "skipped_eval": eval_skipped,
                                              "train_size": len(dataset), "streaming": False}


def load_user_images(paths, processor, resolution) -> torch.Tensor | None:
    """`--validation_images`: center-cropped uint8 `(N, C, R, R)`; unreadable files are skipped with a warning."""
    import numpy as np

    from optvq_hf.training import ImagePreprocessor

    if not paths:
        return None
    pre = ImagePreprocessor(processor, resolution, center_crop=True)
    arrays = []
    for path in paths:
        array = pre(path)
        if array is None:
            logger.warning("Skipping unreadable validation image %s", path)
        else:
            arrays.append(array)
    return torch.from_numpy(np.stack(arrays)) if arrays else None


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, eval_images: torch.Tensor, accelerator, batch_size: int, autocast: bool = True) -> tuple[dict, torch.Tensor]:
    """Mean per-image PSNR (over [0, 1] pixels), code usage, perplexity and dead codes on `eval_images`.

    Every process evaluates a strided shard with the same number of batches (padded and masked), then sums are
    reduced across processes. Returns (metrics, code counts).
    """
    from optvq_hf.training import ReconstructionSpread, codebook_statistics, per_image_psnr, to_pixel_values

    spread = ReconstructionSpread()  # dead-run detection: do reconstructions vary across images?
    was_training = model.training
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    total = eval_images.shape[0]
    per_rank = math.ceil(total / world)
    indices = torch.arange(rank, per_rank * world, world)
    valid = indices < total
    indices = torch.where(valid, indices, torch.zeros_like(indices))
    counts = torch.zeros(model.config.codebook_size, dtype=torch.float64, device=accelerator.device)
    psnr_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for start in range(0, per_rank, batch_size):
        index = indices[start:start + batch_size]
        mask = valid[start:start + batch_size].to(accelerator.device)
        pixel_values = to_pixel_values(eval_images[index]).to(accelerator.device)
        with accelerator.autocast() if autocast else torch.autocast("cpu", enabled=False):
            output = model(pixel_values)
        psnr = per_image_psnr(output.reconstruction, pixel_values).double()
        psnr_sum += (psnr * mask).sum()
        count += mask.sum()
        spread.update(pixel_values, output.reconstruction, mask)
        tokens = output.token_ids[mask].reshape(-1)
        counts += torch.bincount(tokens, minlength=counts.numel()).double()
    psnr_sum, count = accelerator.reduce(psnr_sum, "sum"), accelerator.reduce(count, "sum")
    counts = accelerator.reduce(counts, "sum")
    model.train(was_training)
    metrics = {"psnr": float(psnr_sum / count.clamp_min(1)), "num_eval_images": int(count)}
    metrics.update(codebook_statistics(counts.cpu()))
    spread = spread.reduce_(lambda sums: accelerator.reduce(sums, "sum")).ratio
    if math.isfinite(spread):  # needs two images or more
        metrics["reconstruction_spread"] = spread
    return metrics, counts.cpu()


@torch.no_grad()
def save_validation_pictures(model, eval_images, user_images, counts, output_dir, step, num_images, accelerator):
    """Reconstruction grid and code-usage histogram PNGs under `output_dir/validation/` (main process only)."""
    from optvq_hf.training import save_reconstruction_grid, save_usage_histogram, to_pixel_values

    folder = os.path.join(output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    images = eval_images[:num_images]
    if user_images is not None:
        images = torch.cat([images, user_images])
    was_training = model.training
    model.eval()
    pixel_values = to_pixel_values(images).to(accelerator.device)
    reconstruction = model(pixel_values).reconstruction
    model.train(was_training)
    scale = max(1, 128 // pixel_values.shape[-1])
    grid = save_reconstruction_grid(pixel_values, reconstruction, os.path.join(folder, f"grid-{step:06d}.png"), scale)
    histogram = save_usage_histogram(counts, os.path.join(folder, f"code_usage-{step:06d}.png"),
                                     title=f"Code usage at step {step}")
    for path in (grid, histogram):  # stable names for the latest pictures
        shutil.copyfile(path, os.path.join(output_dir, os.path.basename(path).split("-")[0] + ".png"))
    return grid, histogram


def check_collapse(metrics: dict, counts: torch.Tensor, baseline_psnr: float | None, step: int, log: bool = True):
    """Dead-run detection on evaluation results: adds the verdict and its numbers to `metrics`, warns if collapsed
    (when `log`: on the main process)."""
    from optvq_hf.training import diagnose_collapse

    diagnosis = diagnose_collapse(psnr=metrics.get("psnr"), mean_image_psnr=baseline_psnr,
                                  reconstruction_spread=metrics.get("reconstruction_spread"), code_counts=counts)
    metrics.update(diagnosis.to_dict())
    if diagnosis.collapsed and log:
        logger.warning("step %d: %s", step, diagnosis.message())
    return diagnosis


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------------
def _checkpoints(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    names = [n for n in os.listdir(output_dir) if n.startswith("checkpoint-") and n.split("-")[-1].isdigit()]
    return [os.path.join(output_dir, n) for n in sorted(names, key=lambda n: int(n.split("-")[-1]))]


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None):
    """`accelerator.save_state` into a temporary folder, renamed atomically to `checkpoint-{step}`."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    temporary = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        if total_limit is not None:
            existing = _checkpoints(output_dir)
            for old in existing[: max(0, len(existing) - total_limit)]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_final_model(model, processor, output_dir: str, model_card):
    """`save_pretrained` of model and processor into a temporary folder, then files moved into `output_dir`."""
    temporary = os.path.join(output_dir, ".tmp-final-model")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary, model_card=model_card)
    processor.save_pretrained(temporary)
    for name in os.listdir(temporary):
        os.replace(os.path.join(temporary, name), os.path.join(output_dir, name))
    shutil.rmtree(temporary, ignore_errors=True)


def training_summary(args, description, total_batch, learning_rate, steps, train_time) -> str:
    """Markdown for the model card's Training section."""
    losses = [f"{args.l1_weight:g} x L1", f"{args.l2_weight:g} x L2"]
    if args.perceptual_weight > 0:
        losses.append(f"{args.perceptual_weight:g} x LPIPS")
    losses.append(f"{args.quantization_weight:g} x quantization loss")
    if args.gan_weight > 0:
        losses.append(f"{args.gan_weight:g} x adaptive-weighted hinge PatchGAN loss from step {args.disc_start}")
    return (
        f"Trained with `examples/run_train.py` of optvq-hf on **{description}** (split `{args.train_split}`).\n\n"
        f"- loss: {' + '.join(losses)}\n"
        f"- optimizer: AdamW (betas {args.adam_beta1}, {args.adam_beta2}, eps {args.adam_epsilon:g}), weight decay "
        f"{args.weight_decay:g} on conv/linear weights, peak learning rate {learning_rate:.3g} "
        f"({'base ' + format(args.learning_rate, 'g') + ' x total batch' if args.scale_lr else 'unscaled'})\n"
        f"- schedule: {args.lr_scheduler}, gradient clipping {args.max_grad_norm:g}\n"
        f"- total batch {total_batch}, {steps} optimizer steps, {train_time / 60:.1f} minutes\n"
        f"- codebook initialization: {args.codebook_init}; EMA: {'yes' if args.use_ema else 'no'}\n"
    )


def push_to_hub(args, output_dir: str) -> str:
    """Create the repository and upload `output_dir` (without checkpoints and logs). Returns the repo id."""
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(output_dir))
    repo_id = api.create_repo(repo_id, private=args.hub_private_repo or None, exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=output_dir, commit_message="Upload OptVQ model trained with run_train.py",
                      ignore_patterns=["checkpoint-*", "checkpoint-*/**", ".tmp-*", ".tmp-*/**", "logs/**",
                                       "validation/**"])
    return repo_id


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------
def _set_threads(args, accelerator):
    if accelerator.device.type != "cpu":
        return
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes if accelerator.num_processes else 1))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // max(1, local)))


def _step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + step * 1009 + micro * 101 + rank) % (2**63))
    return generator


def initialize_codebook(args, model, loader, accelerator, resolution):
    """k-means or random encoder features of the first batches (gathered over processes), broadcast from rank 0."""
    from optvq_hf.training import augment_batch, collate_images, features_to_rows, kmeans, sample_codes, set_codebook

    # A separate, plain DataLoader over this process's data (the prepared one keeps its state for training).
    dataset = loader.dataset
    if isinstance(dataset, torch.utils.data.IterableDataset):
        first_pass = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, collate_fn=collate_images)
    else:
        generator = torch.Generator().manual_seed(args.seed + 7919 * (accelerator.process_index + 1))
        first_pass = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True,
                                                 drop_last=True, generator=generator, collate_fn=collate_images)
    rows = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for index, batch in enumerate(first_pass):
            if index >= args.codebook_init_batches:
                break
            pixel_values = augment_batch(batch["images"], resolution, args.random_crop, args.random_flip,
                                         _step_generator(args.seed, -1, index, accelerator.process_index))
            latents = model.encode_latents(pixel_values.to(accelerator.device))
            rows.append(features_to_rows(latents, model.config.num_heads))
    model.train(was_training)
    local = torch.cat(rows)
    features = accelerator.gather(local) if accelerator.num_processes > 1 else local
    generator = torch.Generator(device=features.device).manual_seed(args.seed)
    size = model.config.codebook_size
    if args.codebook_init == "kmeans":
        if features.shape[0] > 50 * size:
            features = features[torch.randperm(features.shape[0], generator=generator, device=features.device)[:50 * size]]
        codes = kmeans(features, size, num_iters=args.codebook_init_iters, generator=generator)
    else:
        codes = sample_codes(features, size, generator=generator)
    set_codebook(model.quantizer, codes)
    if accelerator.num_processes > 1:
        for tensor in model.quantizer.parameters():
            torch.distributed.broadcast(tensor.data, src=0)
    logger.info("Initialized the codebook (%s) from %d encoder feature rows.", args.codebook_init, features.shape[0])


def main(args: argparse.Namespace | list[str] | None = None) -> dict:
    """Train, evaluate, save (and push) an OptVQ model; returns the final metrics (also in `metrics.json`)."""
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from optvq_hf.sinkhorn import set_block_policy
    from optvq_hf.training import (
        EMAModel,
        OptVQLoss,
        augment_batch,
        build_optimizer,
        build_param_groups,
        build_scheduler,
        codebook_statistics,
        mean_image_psnr,
        reconstruction_spread,
        split_weight_decay,
    )

    # The Sinkhorn engine sizes its CPU blocks for how OpenMP threads wait (set above, before torch was imported).
    set_block_policy("passive" if os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE" else "active")
    output_dir = args.output_dir
    report_to = None if args.report_to in (None, "none", "") else args.report_to
    # Several processes on a machine without GPUs (`accelerate launch --multi_gpu` or torchrun on CPU): DDP over gloo.
    has_accelerator = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    cpu_distributed = not has_accelerator and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=cpu_distributed,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=output_dir,
                                            logging_dir=os.path.join(output_dir, args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    _set_threads(args, accelerator)
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
    accelerator.wait_for_everyone()

    # ---- model, data, loss
    model, processor, resolution = load_model_and_processor(args)
    config = model.config
    loader, eval_images, description, data_info = build_data(args, accelerator, processor, resolution)
    user_images = load_user_images(args.validation_images, processor, resolution)
    # What a model that ignores its input scores: the bar a trained model must clearly clear (dead-run detection).
    baseline_psnr = mean_image_psnr(eval_images) if eval_images.shape[0] > 1 else None
    loss_module = OptVQLoss(
        l1_weight=args.l1_weight, l2_weight=args.l2_weight, perceptual_weight=args.perceptual_weight,
        perceptual_model=args.perceptual_model, quantization_weight=args.quantization_weight,
        gan_weight=args.gan_weight, disc_weight=args.disc_weight, disc_start=args.disc_start,
        disc_in_channels=config.out_channels, disc_num_layers=args.disc_num_layers,
        disc_base_channels=args.disc_base_channels, disc_loss=args.disc_loss,
    ).to(accelerator.device)

    # ---- optimization
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    learning_rate = args.learning_rate * total_batch if args.scale_lr else args.learning_rate
    optimizer = build_optimizer(build_param_groups(model, learning_rate, args.weight_decay, args.codebook_lr_multiplier),
                                betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    if data_info["streaming"]:
        steps_per_epoch = None
        max_train_steps = args.max_train_steps
        num_epochs = 10**9
    else:
        steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
        max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
        num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    warmup = args.lr_warmup_steps
    scheduler = build_scheduler(args.lr_scheduler, optimizer, max_train_steps, warmup, args.lr_warmup_ratio)
    discriminator = loss_module.discriminator
    disc_optimizer = disc_scheduler = None
    if discriminator is not None:
        disc_lr = (args.disc_learning_rate or args.learning_rate) * (total_batch if args.scale_lr else 1)
        decayed, not_decayed = split_weight_decay([discriminator])
        disc_optimizer = build_optimizer(
            [{"params": decayed, "lr": disc_lr, "weight_decay": args.weight_decay},
             {"params": not_decayed, "lr": disc_lr, "weight_decay": 0.0}],
            betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        disc_scheduler = build_scheduler(args.lr_scheduler, disc_optimizer, max_train_steps, warmup,
                                         args.lr_warmup_ratio)

    if discriminator is not None:
        model, optimizer, discriminator, disc_optimizer = accelerator.prepare(model, optimizer, discriminator,
                                                                              disc_optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    # Schedulers are stepped by hand once per optimizer step (not `num_processes` times as a prepared one would).
    accelerator.register_for_checkpointing(scheduler)
    if disc_scheduler is not None:
        accelerator.register_for_checkpointing(disc_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    bare_discriminator = accelerator.unwrap_model(discriminator) if discriminator is not None else None

    # ---- resume or initialize
    global_step = 0
    resume_path = None
    if args.resume_from_checkpoint:
        if args.resume_from_checkpoint == "latest":
            existing = _checkpoints(output_dir)
            resume_path = existing[-1] if existing else None
            if resume_path is None:
                logger.info("No checkpoint in %s: starting from scratch.", output_dir)
        else:
            resume_path = args.resume_from_checkpoint
            if not os.path.isdir(resume_path):
                raise ValueError(f"`--resume_from_checkpoint` {resume_path!r} is not a folder.")
    if resume_path is None and args.codebook_init != "none":
        initialize_codebook(args, unwrapped, loader, accelerator, resolution)
    ema = EMAModel(unwrapped, decay=args.ema_decay) if args.use_ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if resume_path is not None:
        accelerator.load_state(resume_path)
        global_step = int(os.path.basename(os.path.normpath(resume_path)).split("-")[-1])
        logger.info("Resumed from %s at step %d.", resume_path, global_step)

    if accelerator.is_main_process and report_to:
        tracker_config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)

    logger.info("***** Training OptVQ *****")
    logger.info("  model: %s (%s, %d parameters)", args.model_config_name_or_path, config.quantizer_type,
                unwrapped.num_parameters())
    logger.info("  data: %s, %s training images, %d evaluation images, %d+%d unreadable skipped", description,
                data_info["train_size"], eval_images.shape[0], data_info["skipped_train"], data_info["skipped_eval"])
    logger.info("  batch %d per device x %d processes x %d accumulation = %d; lr %.3g; %d steps", args.train_batch_size,
                accelerator.num_processes, args.gradient_accumulation_steps, total_batch, learning_rate,
                max_train_steps)
    if baseline_psnr is not None:
        logger.info("  predicting the mean evaluation image scores PSNR %.2f dB (a trained model must beat it)",
                    baseline_psnr)

    progress = tqdm(range(max_train_steps), initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    window_counts = torch.zeros(config.codebook_size, device=accelerator.device)
    window_loss = torch.zeros(5, device=accelerator.device)  # loss, l1, l2, quant, batches
    skipped_on_the_fly = 0  # unreadable images met while iterating (this process); cached ones were counted once
    steps_this_run = 0
    start_time = time.perf_counter()
    first_epoch = global_step // steps_per_epoch if steps_per_epoch else 0
    resume_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps if steps_per_epoch else \
        global_step * args.gradient_accumulation_steps
    micro = 0
    last_metrics: dict = {}
    postfix, health = {}, {}  # progress bar: training numbers, verdict of the latest evaluation
    stopped_early = False
    model.train()
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:
            break
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        elif hasattr(loader, "dataset") and hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        epoch_loader = loader
        if resume_batches and epoch == first_epoch:
            epoch_loader = accelerator.skip_first_batches(loader, resume_batches) if steps_per_epoch else \
                _skip(loader, resume_batches)
        for batch in epoch_loader:
            skipped_on_the_fly += int(batch["num_skipped"])
            generator = _step_generator(args.seed, global_step, micro % args.gradient_accumulation_steps,
                                        accelerator.process_index)
            pixel_values = augment_batch(batch["images"], resolution, args.random_crop, args.random_flip, generator)
            pixel_values = pixel_values.to(accelerator.device, non_blocking=True)
            micro += 1
            gan_on = loss_module.gan_active(global_step)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    output = model(pixel_values)
                if bare_discriminator is not None:
                    bare_discriminator.requires_grad_(False)
                losses = loss_module.generator_loss(
                    pixel_values, output.reconstruction, output.quantization_loss, global_step,
                    last_layer_weight=unwrapped.get_last_layer_weight() if gan_on else None,
                    discriminator=bare_discriminator)
                if bare_discriminator is not None:
                    bare_discriminator.requires_grad_(True)
                accelerator.backward(losses.loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if gan_on:
                with accelerator.accumulate(discriminator):
                    with accelerator.autocast():
                        d_losses = loss_module.discriminator_loss(pixel_values, output.reconstruction, global_step,
                                                                  discriminator=discriminator)
                    accelerator.backward(d_losses.loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(discriminator.parameters(), args.max_grad_norm)
                    disc_optimizer.step()
                    disc_optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                window_counts += output.code_counts.to(window_counts.device)
                window_loss += torch.stack([losses.loss.detach(), losses.l1, losses.l2, losses.quantization,
                                            torch.ones((), device=window_loss.device)]).to(window_loss.device)
            if not accelerator.sync_gradients:
                continue

            # ---- one optimizer step done
            scheduler.step()
            if disc_scheduler is not None:
                with warnings.catch_warnings():  # it follows the step count even before the discriminator starts
                    warnings.simplefilter("ignore", UserWarning)
                    disc_scheduler.step()
            if ema is not None:
                ema.step(unwrapped)
            global_step += 1
            steps_this_run += 1
            progress.update(1)

            if global_step % args.logging_steps == 0 or global_step == max_train_steps:
                totals = accelerator.reduce(window_loss.clone(), "sum")
                counts = accelerator.reduce(window_counts.clone(), "sum")
                stats = codebook_statistics(counts.cpu())
                batches = float(totals[4].clamp_min(1))
                logs = {"train/loss": float(totals[0]) / batches, "train/l1": float(totals[1]) / batches,
                        "train/l2": float(totals[2]) / batches, "train/quantization": float(totals[3]) / batches,
                        "train/codebook_usage": stats["codebook_usage"], "train/perplexity": stats["perplexity"],
                        "train/dead_codes": stats["dead_codes"], "train/lr": scheduler.get_last_lr()[0],
                        "train/reconstruction_spread": reconstruction_spread(pixel_values, output.reconstruction),
                        "train/skipped_images": data_info["skipped_train"] + skipped_on_the_fly}
                if gan_on:
                    logs.update({"train/generator": float(losses.generator), "train/generator_weight":
                                 float(losses.generator_weight), "train/discriminator": float(d_losses.discriminator)})
                postfix = {"loss": f"{logs['train/loss']:.4f}", "usage": f"{100 * stats['codebook_usage']:.1f}%",
                           "spread": f"{logs['train/reconstruction_spread']:.2f}"}
                progress.set_postfix(**postfix, **health)
                accelerator.log(logs, step=global_step)
                window_counts.zero_()
                window_loss.zero_()

            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)

            if args.validation_steps and global_step % args.validation_steps == 0 and global_step < max_train_steps:
                metrics, counts = evaluate(unwrapped, eval_images, accelerator, args.eval_batch_size)
                diagnosis = check_collapse(metrics, counts, baseline_psnr, global_step, accelerator.is_main_process)
                health = {"eval": "COLLAPSED" if diagnosis.collapsed else f"{metrics['psnr']:.1f}dB"}
                progress.set_postfix(**postfix, **health)
                accelerator.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                                step=global_step)
                if accelerator.is_main_process:
                    save_validation_pictures(unwrapped, eval_images, user_images, counts, output_dir, global_step,
                                             args.num_validation_images, accelerator)
                    logger.info("step %d: eval PSNR %.2f dB, usage %.1f%%", global_step, metrics["psnr"],
                                100 * metrics["codebook_usage"])
                last_metrics = metrics

            if args.stop_after_steps and steps_this_run >= args.stop_after_steps and global_step < max_train_steps:
                if not (args.checkpointing_steps and global_step % args.checkpointing_steps == 0):
                    save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
                stopped_early = True
            if global_step >= max_train_steps or stopped_early:
                break
        if global_step >= max_train_steps or stopped_early:
            break
    progress.close()
    train_time = time.perf_counter() - start_time
    if stopped_early:
        logger.info("Stopped after %d steps of this run (step %d of %d); resume with --resume_from_checkpoint latest.",
                    steps_this_run, global_step, max_train_steps)
        accelerator.end_training()
        _release_accelerate_state(accelerator)
        return {"stopped_at_step": global_step}

    # ---- final evaluation, save, push
    if ema is not None:
        ema.copy_to(unwrapped)
    metrics, final_counts = {}, None
    if not args.skip_final_eval:
        metrics, final_counts = evaluate(unwrapped, eval_images, accelerator, args.eval_batch_size)
        check_collapse(metrics, final_counts, baseline_psnr, global_step, accelerator.is_main_process)
    metrics.update({
        "global_step": global_step,
        "steps_this_run": steps_this_run,
        "train_time_s": train_time,
        "seconds_per_step": train_time / max(1, steps_this_run),
        "total_batch_size": total_batch,
        "learning_rate": learning_rate,
        "num_processes": accelerator.num_processes,
        "skipped_train_images": data_info["skipped_train"] + int(
            accelerator.reduce(torch.tensor(skipped_on_the_fly, device=accelerator.device), "sum")),
        "skipped_eval_images": data_info["skipped_eval"],
        "dataset": description,
        "model": args.model_config_name_or_path,
        "quantizer_type": config.quantizer_type,
    })
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from optvq_hf.model_card import build_model_card

        card = build_model_card(
            config, repo_id=args.hub_model_id or os.path.basename(os.path.abspath(output_dir)),
            num_parameters=unwrapped.num_parameters(),
            training_summary=training_summary(args, description, total_batch, learning_rate, global_step, train_time)
            + ("\n**Warning: this run collapsed** (its reconstructions do not depend on its inputs): "
               + " ".join(metrics["collapse_reasons"]) + "\n" if metrics.get("collapsed") else ""),
            eval_results={k: metrics[k] for k in ("psnr", "codebook_usage", "perplexity") if k in metrics} or None,
            dataset_name=description if (args.dataset_name or args.train_data_dir) else None,
        )
        save_final_model(unwrapped, processor, output_dir, card)
        if not args.skip_final_eval:
            save_validation_pictures(unwrapped, eval_images, user_images, final_counts, output_dir, global_step,
                                     args.num_validation_images, accelerator)
            metrics["grid"] = os.path.join(output_dir, "grid.png")
            metrics["code_usage_histogram"] = os.path.join(output_dir, "code_usage.png")
        with open(os.path.join(output_dir, "metrics.json"), "w") as handle:
            json.dump(metrics, handle, indent=2)
        if args.push_to_hub:
            metrics["hub_repo_id"] = push_to_hub(args, output_dir)
        logger.info("Final metrics: %s", json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
        if metrics.get("collapsed"):
            logger.error("The final model COLLAPSED: %s", " ".join(metrics["collapse_reasons"]))
        print(final_summary(metrics, config, output_dir, os.path.join(output_dir, args.logging_dir) if report_to else None,
                            demo=is_demo_setting(args)), flush=True)
    if report_to:
        accelerator.log({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=global_step)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    _release_accelerate_state(accelerator)
    return metrics


# `make demo` (the Makefile's DEMO_ARGS on the bundled data): the settings it overrides, and the final PSNR it reached
# across seeds (docs/benchmarks.md, "The demo across seeds"). tests/test_training_health.py checks that the Makefile
# still runs this setting, so the summary's claim cannot drift from the demo.
DEMO_SETTING = {"model_config_name_or_path": DEFAULT_MODEL, "config_overrides": "codebook_size=256",
                "max_train_steps": 500, "train_batch_size": 32, "learning_rate": 1e-4, "codebook_init": "none",
                "dataset_name": None, "train_data_dir": None}
DEMO_EXPECTED_PSNR = "25.6 to 26.6 dB"


def is_demo_setting(args: argparse.Namespace) -> bool:
    """Whether `args` train the `make demo` setting (whatever the seed and output folder)."""
    return all(getattr(args, name) == value for name, value in DEMO_SETTING.items())


def final_summary(metrics: dict, config, output_dir: str, logging_dir: str | None, demo: bool = False) -> str:
    """The text printed at the end of training: the verdict, what the numbers mean, and which files to open."""
    from optvq_hf.quantization import get_quantizer_class

    label = get_quantizer_class(config.quantizer_type).display_name
    where = os.path.abspath(output_dir)
    steps, train_time = metrics["global_step"], metrics["train_time_s"]
    baseline = metrics.get("mean_image_psnr")
    lines = []
    if metrics.get("collapsed"):
        lines += [f"\n{label} training FAILED: the model COLLAPSED after {steps} steps ({train_time:.0f} s).",
                  "Its reconstructions do not follow its inputs; do not use this model. Why:",
                  *(f"  - {reason}" for reason in metrics["collapse_reasons"]),
                  "Try a lower --learning_rate or more --max_train_steps (docs/training.md, 'Is my run healthy?')."]
    else:
        lines.append(f"\n{label} training done: {steps} steps in {train_time:.0f} s "
                     f"({metrics['seconds_per_step']:.3f} s/step).")
        if "psnr" not in metrics:
            lines.append("No final evaluation (--skip_final_eval), so no verdict.")
        else:
            gain = f", {metrics['psnr'] - baseline:+.1f} dB over predicting the average image" if baseline else ""
            lines.append(f"Verdict: healthy, the reconstructions follow their inputs ({metrics['psnr']:.2f} dB{gain}).")
    if "psnr" in metrics:
        size = config.codebook_size
        psnr_notes = ["closeness of the reconstructions to the originals (higher is better; +3 dB = half the error)."]
        if baseline is not None:
            psnr_notes.append(f"Predicting the average image for every input scores {baseline:.2f} dB here.")
        if demo:
            psnr_notes.append(f"`make demo` reaches {DEMO_EXPECTED_PSNR} (seeds 0-9); the paper's CIFAR-10 model 28.8 "
                              "dB after 100 epochs.")
        column = 23
        lines += [f"\nWhat the numbers mean ({metrics['num_eval_images']} held-out images, tokens by nearest code):",
                  f"  {'PSNR ' + format(metrics['psnr'], '.2f') + ' dB':<{column - 2}}{psnr_notes[0]}",
                  *(" " * column + note for note in psnr_notes[1:]),
                  f"  {'code usage ' + format(100 * metrics['codebook_usage'], '.1f') + ' %':<{column - 2}}share of "
                  f"the {size} codes that the images use; OptVQ keeps it near 100 % (plain VQ",
                  " " * column + "often uses a few %).",
                  f"  {'perplexity ' + format(metrics['perplexity'], '.1f'):<{column - 2}}effective number of codes in "
                  f"use (at most {size}; higher = codes used more evenly)."]
    lines.append("\nOpen:")
    if "grid" in metrics:
        lines += [f"  {os.path.abspath(metrics['grid'])}",
                  "      top row: originals; bottom row: their reconstructions. Good: the same shapes and colours, a "
                  "little blurred.",
                  "      Collapsed: every reconstruction the same flat (often grey) square.",
                  f"  {os.path.abspath(metrics['code_usage_histogram'])}",
                  "      tokens per code, most used first: a long, gently falling curve is good; a few tall bars mean "
                  "few codes in use."]
    lines += [f"  {os.path.join(where, 'metrics.json')}    every number and the verdict (\"collapsed\": "
              f"{json.dumps(metrics.get('collapsed'))})",
              f"  {where}    the model: OptVQModel.from_pretrained({where!r})"]
    if logging_dir is not None:
        lines.append(f"  tensorboard --logdir {os.path.abspath(logging_dir)}    loss, PSNR and code usage over time")
    return "\n".join(lines)


def _release_accelerate_state(accelerator):
    """Let a later `main()` in the same (single) process choose other Accelerate settings (e.g. mixed precision);
    with several processes, shut the process group down (exiting with a live gloo group can hang at exit)."""
    if accelerator.num_processes == 1:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    else:
        accelerator.state.destroy_process_group()


def _skip(loader, count):
    for index, batch in enumerate(loader):
        if index >= count:
            yield batch


COLLAPSE_EXIT_CODE = 3


def cli():
    """The console command `optvq-train` (and `python examples/run_train.py`): `main()` on the command line; exits
    with status `COLLAPSE_EXIT_CODE` when `--fail_on_collapse` is given and the final model collapsed, else 0 (the
    metrics are not returned: a console command exits with the return value of its function)."""
    args = parse_args()
    metrics = main(args)
    sys.exit(COLLAPSE_EXIT_CODE if args.fail_on_collapse and metrics.get("collapsed") else 0)


if __name__ == "__main__":
    cli()
