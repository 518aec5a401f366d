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
import itertools
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
from huggingface_hub import HfApi  # noqa: E402

from optvq_hf import OptVQConfig, OptVQImageProcessor, OptVQModel  # noqa: E402
from optvq_hf.configuration_optvq import PRESETS  # noqa: E402
from optvq_hf.metrics import codebook_statistics, save_reconstruction_grid, save_usage_histogram  # noqa: E402
from optvq_hf.model_card import build_model_card  # noqa: E402
from optvq_hf.quantization import get_quantizer_class  # noqa: E402
from optvq_hf.sinkhorn import get_block_policy, set_block_policy  # noqa: E402
from optvq_hf.training import (  # noqa: E402
    MAX_LATENT_CODEBOOK_RATIO,
    MAX_TRAINING_LATENT_MAGNITUDE,
    EMAModel,
    ImagePreprocessor,
    OptVQLoss,
    RunningMeans,
    accelerate_state_conflicts,
    augment_batch,
    augmentation_generator,
    build_demo_dataset,
    build_image_dataset,
    build_optimizer,
    build_param_groups,
    build_scheduler,
    checkpoint_step,
    collate_images,
    decode_image_column,
    decode_images,
    diagnose_collapse,
    diagnose_divergence,
    divergence_signal,
    evaluate_reconstruction,
    find_image_column,
    initialize_codebook,
    list_checkpoints,
    load_image_dataset,
    mean_image_psnr,
    reconstruction_spread,
    reduce_divergence_signal,
    resolve_resume_checkpoint,
    run_in_fresh_process,
    save_checkpoint,
    save_final_model,
    set_cpu_threads,
    several_processes_on_cpu,
    split_train_and_eval,
    split_weight_decay,
    to_pixel_values,
)
from optvq_hf.validation import MAX_FEATURE_MAGNITUDE  # noqa: E402

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
    group.add_argument("--sinkhorn_block_policy", choices=("auto", "active", "passive"), default="auto",
                       help="How the Sinkhorn engine sizes its CPU blocks (optvq_hf.sinkhorn.set_block_policy); auto: "
                            "'passive' when OMP_WAIT_POLICY=PASSIVE (which this script sets unless the environment "
                            "does), else 'active'.")

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
    group.add_argument("--max_latent_magnitude", type=float, default=MAX_TRAINING_LATENT_MAGNITUDE,
                       help="Divergence check on every step: the run stops as DIVERGED (exit status 4) when the loss is "
                            "NaN / Inf or the encoder's latents exceed this magnitude (0 turns this check off).")
    group.add_argument("--max_latent_codebook_ratio", type=float, default=MAX_LATENT_CODEBOOK_RATIO,
                       help="Divergence check on every step: the run stops as DIVERGED (exit status 4) when the "
                            "encoder's largest latent exceeds this many times the codebook's largest coordinate: the "
                            "latents left the region the codes cover (healthy runs: within about 3; 0 turns it off). It "
                            "starts at the first step whose latents are within the limit (a codebook initialized far "
                            "smaller than the latents is not a divergence).")
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
    for name in ("max_latent_magnitude", "max_latent_codebook_ratio"):
        if not getattr(args, name) >= 0:
            raise ValueError(f"`--{name}` must be >= 0, got {getattr(args, name)}.")
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


def sinkhorn_block_policy(choice: str) -> str:
    """`--sinkhorn_block_policy`: `auto` follows how this process's OpenMP threads wait (`OMP_WAIT_POLICY`)."""
    if choice != "auto":
        return choice
    return "passive" if os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE" else "active"


# --------------------------------------------------------------------------------------------------------------------
# Model, processor and data
# --------------------------------------------------------------------------------------------------------------------
def load_model_and_processor(args):
    """The model (new from a preset / config, or pretrained) and its image processor."""
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


@torch.no_grad()
def log_validation(model, images, counts, output_dir: str, step: int) -> tuple[str, str]:
    """Reconstruction grid and code-usage histogram under `output_dir/validation/`, copied to `grid.png` and
    `code_usage.png` (the latest). Main process only."""
    folder = os.path.join(output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    was_training = model.training
    model.eval()
    pixel_values = to_pixel_values(images).to(model.device)
    reconstruction = model(pixel_values).reconstruction
    model.train(was_training)
    grid = save_reconstruction_grid(pixel_values, reconstruction, os.path.join(folder, f"grid-{step:06d}.png"),
                                    scale=max(1, 128 // pixel_values.shape[-1]))
    histogram = save_usage_histogram(counts, os.path.join(folder, f"code_usage-{step:06d}.png"),
                                     title=f"Code usage at step {step}")
    for path in (grid, histogram):
        shutil.copyfile(path, os.path.join(output_dir, os.path.basename(path).split("-")[0] + ".png"))
    return grid, histogram


def check_collapse(metrics: dict, counts: torch.Tensor, baseline_psnr: float | None, step: int, log: bool = True):
    """Dead-run detection on evaluation results: adds the verdict and its numbers to `metrics`, warns if collapsed
    (when `log`: on the main process)."""
    diagnosis = diagnose_collapse(psnr=metrics.get("psnr"), mean_image_psnr=baseline_psnr,
                                  reconstruction_spread=metrics.get("reconstruction_spread"), code_counts=counts)
    metrics.update(diagnosis.to_dict())
    if diagnosis.collapsed and log:
        logger.warning("step %d: %s", step, diagnosis.message())
    return diagnosis


def is_numerical_failure(error: ValueError) -> bool:
    """Whether a `ValueError` of the model's forward pass on (valid) training pixels reports unusable numbers (NaN,
    Inf or a magnitude beyond what the quantizer accepts), which the weights, not the data, produced."""
    text = str(error)
    return "NaN or Inf" in text or "magnitude" in text


@torch.no_grad()
def parameters_finite(model) -> bool:
    """Whether every weight of `model` is finite (one reduction per tensor, read once)."""
    flags = [torch.isfinite(parameter).all() for parameter in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def backward_and_step(accelerator, loss, module, optimizer, max_grad_norm: float):
    """Back-propagate (accumulating), clip the gradients of `module` at the optimizer step, step and zero them."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm > 0:
        accelerator.clip_grad_norm_(module.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace | list[str] | None = None) -> dict:
    """Train, evaluate, save (and push) an OptVQ model; returns the final metrics (also in `metrics.json`)."""
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    # Accelerate keeps one state per process: a run with other settings than an earlier one here gets a new process.
    if accelerate_state_conflicts(args.mixed_precision):
        return run_in_fresh_process(main, args)
    # The Sinkhorn engine sizes its CPU blocks for how this process's OpenMP threads wait (set before torch loaded);
    # the setting is the process's, so it is put back for whatever runs after main() in the same process.
    previous_block_policy = get_block_policy()
    set_block_policy(sinkhorn_block_policy(args.sinkhorn_block_policy))
    try:
        return train(args)
    finally:
        set_block_policy(previous_block_policy)


def train(args: argparse.Namespace) -> dict:
    """The run itself, top to bottom (see [`main`])."""
    # The `[train]` extra, imported here so that the `optvq-train` command loads with the core install alone.
    import datasets
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import ProjectConfiguration, set_seed
    from datasets.distributed import split_dataset_by_node
    from tqdm.auto import tqdm

    # ---- accelerator, logging, seed
    output_dir = args.output_dir
    report_to = None if args.report_to in (None, "none", "") else args.report_to
    # Several processes on a machine without GPUs (`accelerate launch --multi_gpu` or torchrun on CPU): DDP over gloo.
    accelerator = Accelerator(
        cpu=several_processes_on_cpu(),
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
    if accelerator.device.type == "cpu":
        set_cpu_threads(args.num_threads, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
    accelerator.wait_for_everyone()

    # ---- model and processor
    model, processor, resolution = load_model_and_processor(args)
    config = model.config

    # ---- data: the training split (decoded and resized once when it fits) and a small evaluation set in memory
    with accelerator.main_process_first():
        if args.dataset_name is None and args.train_data_dir is None:
            raw = build_demo_dataset(num_train=args.demo_num_images, num_test=max(64, args.num_validation_images),
                                     resolution=resolution, seed=0)
            description = "demo (random crops of scikit-image's bundled photos)"
        else:
            raw = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir,
                                     streaming=args.streaming, cache_dir=args.cache_dir, token=args.hub_token)
            description = args.dataset_name or args.train_data_dir
    image_column = find_image_column(raw[args.train_split].features, args.image_column) if args.train_split in raw \
        else None  # (an unknown split: split_train_and_eval says so)
    center_crops = ImagePreprocessor(processor, resolution, center_crop=True)
    train_split, eval_split = split_train_and_eval(raw, args.train_split, args.validation_split,
                                                   args.validation_split_percentage, args.max_eval_samples, args.seed,
                                                   image_column=image_column, preprocessor=center_crops)
    eval_images, skipped_eval = decode_image_column(eval_split, image_column, center_crops)
    if eval_images is None:
        raise ValueError("No readable image in the evaluation set.")
    # What a model that ignores its input scores: the bar a trained model must clearly clear (dead-run detection).
    baseline_psnr = mean_image_psnr(eval_images) if eval_images.shape[0] > 1 else None
    user_images, unreadable = decode_images(args.validation_images or [], center_crops)
    for index in unreadable:
        logger.warning("Skipping unreadable validation image %s", args.validation_images[index])
    grid_images = eval_images[: args.num_validation_images]
    if user_images is not None:
        grid_images = torch.cat([grid_images, user_images])

    streaming = isinstance(train_split, datasets.IterableDataset)
    if streaming:
        train_split = train_split.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
        if accelerator.num_processes > 1:
            train_split = split_dataset_by_node(train_split, accelerator.process_index, accelerator.num_processes)
    elif args.max_train_samples is not None:
        train_split = train_split.select(range(min(args.max_train_samples, len(train_split))))
    with accelerator.main_process_first():
        train_dataset, skipped_train = build_image_dataset(
            train_split, image_column, ImagePreprocessor(processor, resolution), cache=args.cache_preprocessed,
            num_proc=args.preprocessing_num_workers)
    if not streaming and len(train_dataset) < args.train_batch_size * accelerator.num_processes:
        raise ValueError(f"The training set has {len(train_dataset)} readable images, fewer than one global batch "
                         f"({args.train_batch_size} x {accelerator.num_processes} processes).")
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.train_batch_size, shuffle=not streaming, drop_last=True,
        collate_fn=collate_images, num_workers=args.dataloader_num_workers,
        persistent_workers=args.dataloader_num_workers > 0 and not streaming)
    if not streaming:  # a streamed dataset is already split between processes
        train_dataloader = accelerator.prepare(train_dataloader)

    # ---- loss, optimizers, schedulers
    loss_fn = OptVQLoss(
        l1_weight=args.l1_weight, l2_weight=args.l2_weight, perceptual_weight=args.perceptual_weight,
        perceptual_model=args.perceptual_model, quantization_weight=args.quantization_weight,
        gan_weight=args.gan_weight, disc_weight=args.disc_weight, disc_start=args.disc_start,
        disc_in_channels=config.out_channels, disc_num_layers=args.disc_num_layers,
        disc_base_channels=args.disc_base_channels, disc_loss=args.disc_loss,
    ).to(accelerator.device)
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    learning_rate = args.learning_rate * total_batch if args.scale_lr else args.learning_rate
    optimizer = build_optimizer(build_param_groups(model, learning_rate, args.weight_decay, args.codebook_lr_multiplier),
                                betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    if streaming:
        steps_per_epoch, max_train_steps, num_epochs = None, args.max_train_steps, 10**9
    else:
        steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
        num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    scheduler = build_scheduler(args.lr_scheduler, optimizer, max_train_steps, args.lr_warmup_steps,
                                args.lr_warmup_ratio)
    discriminator, disc_optimizer, disc_scheduler = loss_fn.discriminator, None, None
    if discriminator is not None:
        disc_lr = (args.disc_learning_rate or args.learning_rate) * (total_batch if args.scale_lr else 1)
        decayed, not_decayed = split_weight_decay([discriminator])
        disc_optimizer = build_optimizer(
            [{"params": decayed, "lr": disc_lr, "weight_decay": args.weight_decay},
             {"params": not_decayed, "lr": disc_lr, "weight_decay": 0.0}],
            betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        disc_scheduler = build_scheduler(args.lr_scheduler, disc_optimizer, max_train_steps, args.lr_warmup_steps,
                                         args.lr_warmup_ratio)

    # ---- prepare; schedulers are stepped by hand once per optimizer step (not once per process, as prepared ones)
    if discriminator is not None:
        model, optimizer, discriminator, disc_optimizer = accelerator.prepare(model, optimizer, discriminator,
                                                                              disc_optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    for schedule in (scheduler, disc_scheduler):
        if schedule is not None:
            accelerator.register_for_checkpointing(schedule)
    unwrapped = accelerator.unwrap_model(model)
    bare_discriminator = accelerator.unwrap_model(discriminator) if discriminator is not None else None

    # ---- resume, or initialize the codebook from encoder features of the first batches
    resume_path = resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint == "latest" and resume_path is None:
        logger.info("No checkpoint in %s: starting from scratch.", output_dir)
    if resume_path is None and args.codebook_init != "none":
        first_pass = torch.utils.data.DataLoader(  # this process's data, apart from the prepared loader's state
            train_dataset, batch_size=args.train_batch_size, collate_fn=collate_images,
            **({} if streaming else dict(shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(
                args.seed + 7919 * (accelerator.process_index + 1)))))
        batches = (augment_batch(batch["images"], resolution, args.random_crop, args.random_flip,
                                 augmentation_generator(args.seed, -1, index, accelerator.process_index))
                   for index, batch in zip(range(args.codebook_init_batches), first_pass))
        rows = initialize_codebook(unwrapped, batches, args.codebook_init, num_iters=args.codebook_init_iters,
                                   seed=args.seed)
        logger.info("Initialized the codebook (%s) from %d encoder feature rows.", args.codebook_init, rows)
    ema = EMAModel(unwrapped, decay=args.ema_decay) if args.use_ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    global_step = 0
    if resume_path is not None:
        accelerator.load_state(resume_path)
        global_step = checkpoint_step(resume_path)
        logger.info("Resumed from %s at step %d.", resume_path, global_step)

    if accelerator.is_main_process and report_to:
        tracker_config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)

    logger.info("***** Training OptVQ *****")
    logger.info("  model: %s (%s, %d parameters)", args.model_config_name_or_path, config.quantizer_type,
                unwrapped.num_parameters())
    logger.info("  data: %s, %s training images, %d evaluation images, %d+%d unreadable skipped", description,
                None if streaming else len(train_dataset), eval_images.shape[0], skipped_train, skipped_eval)
    logger.info("  batch %d per device x %d processes x %d accumulation = %d; lr %.3g; %d steps", args.train_batch_size,
                accelerator.num_processes, args.gradient_accumulation_steps, total_batch, learning_rate,
                max_train_steps)
    if baseline_psnr is not None:
        logger.info("  predicting the mean evaluation image scores PSNR %.2f dB (a trained model must beat it)",
                    baseline_psnr)

    # ---- training loop
    progress = tqdm(range(max_train_steps), initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    loss_means = RunningMeans()  # every loss term the loss reports, averaged over the logging window and processes
    window_counts = torch.zeros(config.codebook_size, device=accelerator.device)
    skipped_on_the_fly = 0  # unreadable images met while iterating (this process); cached ones were counted once
    steps_this_run, micro_step, last_metrics, stopped_early = 0, 0, {}, False
    divergence, latent_magnitude, last_eval = diagnose_divergence(), None, None  # verdict of the latest step
    # The latents-to-codebook check starts once the latents have been within its limit: a run whose codebook starts
    # far smaller than its latents (taming's uniform(-1/K, 1/K), a user's own initialization) is outside the codes'
    # region from step 1 although its codes move to the latents; until they have, only the absolute limit applies.
    latent_codebook_ratio, codebook_check_armed = None, False
    postfix, health = {}, {}  # progress bar: training numbers, verdict of the latest evaluation
    first_epoch = global_step // steps_per_epoch if steps_per_epoch else 0
    resume_batches = args.gradient_accumulation_steps * (global_step % steps_per_epoch if steps_per_epoch else
                                                         global_step)
    start_time = time.perf_counter()
    model.train()
    for epoch in range(first_epoch, num_epochs):
        for source in (train_dataloader, getattr(train_dataloader, "dataset", None)):
            if hasattr(source, "set_epoch"):
                source.set_epoch(epoch)
                break
        epoch_batches = train_dataloader
        if resume_batches and epoch == first_epoch:
            epoch_batches = (itertools.islice(train_dataloader, resume_batches, None) if streaming else
                             accelerator.skip_first_batches(train_dataloader, resume_batches))
        for batch in epoch_batches:
            skipped_on_the_fly += int(batch["num_skipped"])
            generator = augmentation_generator(args.seed, global_step, micro_step % args.gradient_accumulation_steps,
                                               accelerator.process_index)
            pixel_values = augment_batch(batch["images"], resolution, args.random_crop, args.random_flip, generator)
            pixel_values = pixel_values.to(accelerator.device, non_blocking=True)
            micro_step += 1
            gan_on = loss_fn.gan_active(global_step)
            with accelerator.accumulate(model):
                try:
                    with accelerator.autocast():
                        output = model(pixel_values)
                except ValueError as error:
                    if not is_numerical_failure(error):
                        raise
                    # The weights of the last step give latents the model refuses (NaN, Inf, beyond 1e15): diverged.
                    logger.warning("step %d: the forward pass failed: %s", global_step + 1, error)
                    output = None
                if output is not None:
                    if bare_discriminator is not None:  # frozen while it scores the generator
                        bare_discriminator.requires_grad_(False)
                    losses = loss_fn.generator_loss(
                        pixel_values, output.reconstruction, output.quantization_loss, global_step,
                        last_layer_weight=unwrapped.get_last_layer_weight() if gan_on else None,
                        discriminator=bare_discriminator)
                    if bare_discriminator is not None:
                        bare_discriminator.requires_grad_(True)
                # Divergence check before the update: three numbers, their maximum over processes, so that every rank
                # stops at the same step (a rank that stopped alone would leave the others waiting in a collective).
                with torch.no_grad():  # the codes in use: the same on every process
                    codebook = unwrapped.quantizer.codebook
                signal = reduce_divergence_signal(divergence_signal(
                    losses.loss if output is not None else None, output.latents if output is not None else None,
                    device=accelerator.device, codebook=codebook)).tolist()
                latent_magnitude, latent_codebook_ratio = signal[1], signal[2]
                codebook_check_armed = codebook_check_armed or latent_codebook_ratio <= args.max_latent_codebook_ratio
                divergence = diagnose_divergence(signal[0] == 0, latent_magnitude, global_step + 1,
                                                 args.max_latent_magnitude, forward_failed=signal[0] == 2,
                                                 latent_codebook_ratio=latent_codebook_ratio,
                                                 max_latent_codebook_ratio=(args.max_latent_codebook_ratio
                                                                            if codebook_check_armed else 0))
                if divergence.diverged:
                    break
                backward_and_step(accelerator, losses.loss, model, optimizer, args.max_grad_norm)
            loss_means.add(loss_fn.log_terms(losses, global_step))
            if gan_on:
                with accelerator.accumulate(discriminator):
                    with accelerator.autocast():
                        d_losses = loss_fn.discriminator_loss(pixel_values, output.reconstruction, global_step,
                                                              discriminator=discriminator)
                    backward_and_step(accelerator, d_losses.loss, discriminator, disc_optimizer, args.max_grad_norm)
                loss_means.add(loss_fn.log_terms(d_losses, global_step))
            window_counts += output.code_counts.detach().sum(0).to(window_counts.device)
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
                usage = codebook_statistics(accelerator.reduce(window_counts, "sum"))
                logs = {f"train/{name}": value for name, value in loss_means.compute().items()}
                logs.update({f"train/{key}": usage[key] for key in ("codebook_usage", "perplexity", "dead_codes")})
                logs.update({"train/lr": scheduler.get_last_lr()[0], "train/latent_magnitude": latent_magnitude,
                             "train/latent_codebook_ratio": latent_codebook_ratio,
                             "train/reconstruction_spread": reconstruction_spread(pixel_values, output.reconstruction),
                             "train/skipped_images": skipped_train + skipped_on_the_fly})
                postfix = {"loss": f"{logs['train/loss']:.4f}", "usage": f"{100 * usage['codebook_usage']:.1f}%",
                           "spread": f"{logs['train/reconstruction_spread']:.2f}"}
                progress.set_postfix(**postfix, **health)
                accelerator.log(logs, step=global_step)
                loss_means.reset()
                window_counts.zero_()

            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)

            if args.validation_steps and global_step % args.validation_steps == 0 and global_step < max_train_steps:
                last_metrics, counts = evaluate_reconstruction(unwrapped, eval_images, args.eval_batch_size,
                                                               autocast=accelerator.autocast)
                diagnosis = check_collapse(last_metrics, counts, baseline_psnr, global_step,
                                           accelerator.is_main_process)
                health = {"eval": "COLLAPSED" if diagnosis.collapsed else f"{last_metrics['psnr']:.1f}dB"}
                progress.set_postfix(**postfix, **health)
                accelerator.log({f"eval/{k}": v for k, v in last_metrics.items() if isinstance(v, (int, float))},
                                step=global_step)
                last_eval = {"step": global_step, **{key: last_metrics[key] for key in
                                                    ("psnr", "codebook_usage", "perplexity", "collapsed")}}
                if accelerator.is_main_process:
                    log_validation(unwrapped, grid_images, counts, output_dir, global_step)
                    logger.info("step %d: eval PSNR %.2f dB, usage %.1f%%", global_step, last_metrics["psnr"],
                                100 * last_metrics["codebook_usage"])

            if args.stop_after_steps and steps_this_run >= args.stop_after_steps and global_step < max_train_steps:
                if not (args.checkpointing_steps and global_step % args.checkpointing_steps == 0):
                    save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
                stopped_early = True
            if global_step >= max_train_steps or stopped_early:
                break
        if global_step >= max_train_steps or stopped_early or divergence.diverged:
            break
    if divergence.diverged:
        progress.set_postfix(**postfix, **health, run="DIVERGED")
        if accelerator.is_main_process:
            logger.warning("step %d: %s", divergence.step, divergence.message())
    progress.close()
    train_time = time.perf_counter() - start_time
    if stopped_early:
        logger.info("Stopped after %d steps of this run (step %d of %d); resume with --resume_from_checkpoint latest.",
                    steps_this_run, global_step, max_train_steps)
        end_training(accelerator)
        return {"stopped_at_step": global_step}

    # ---- final evaluation, save, push
    if ema is not None:
        ema.copy_to(unwrapped)
    metrics, final_counts = {}, None
    # A diverged run keeps the weights of its last completed step (the diverged step's update was not applied) when
    # they are finite, and evaluates them when their latents are still within what the quantizer accepts.
    keep_model = not divergence.diverged or parameters_finite(unwrapped)
    evaluable = keep_model and (not divergence.diverged or (
        math.isfinite(divergence.latent_magnitude) and divergence.latent_magnitude < 1e-3 * MAX_FEATURE_MAGNITUDE))
    if not args.skip_final_eval and evaluable:
        metrics, final_counts = evaluate_reconstruction(unwrapped, eval_images, args.eval_batch_size,
                                                        autocast=accelerator.autocast)
        check_collapse(metrics, final_counts, baseline_psnr, global_step, accelerator.is_main_process)
    metrics.update(divergence.to_dict())
    if divergence.diverged:
        metrics["last_eval"] = last_eval  # the last periodic evaluation before the divergence (None: none ran)
        metrics["final_model_saved"] = keep_model
        metrics["last_checkpoint"] = (list_checkpoints(output_dir) or [None])[-1]
    skipped_on_the_fly = int(accelerator.reduce(torch.tensor(skipped_on_the_fly, device=accelerator.device), "sum"))
    metrics.update({
        "global_step": global_step,
        "steps_this_run": steps_this_run,
        "train_time_s": train_time,
        "seconds_per_step": train_time / max(1, steps_this_run),
        "total_batch_size": total_batch,
        "learning_rate": learning_rate,
        "num_processes": accelerator.num_processes,
        "skipped_train_images": skipped_train + skipped_on_the_fly,
        "skipped_eval_images": skipped_eval,
        "dataset": description,
        "model": args.model_config_name_or_path,
        "quantizer_type": config.quantizer_type,
    })
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        repo_id = args.hub_model_id or os.path.basename(os.path.abspath(output_dir))
        card = build_model_card(
            config, repo_id=repo_id, num_parameters=unwrapped.num_parameters(),
            training_summary=training_summary(args, description, total_batch, learning_rate, global_step, train_time)
            + "".join(f"\n{failure['card']}: {' '.join(failure['reasons'])}\n"
                      for failure in run_failures(metrics)),
            eval_results={k: metrics[k] for k in ("psnr", "codebook_usage", "perplexity") if k in metrics} or None,
            dataset_name=description if (args.dataset_name or args.train_data_dir) else None,
        )
        if keep_model:  # never non-finite weights
            save_final_model(unwrapped, processor, output_dir, card)
        if final_counts is not None:
            log_validation(unwrapped, grid_images, final_counts, output_dir, global_step)
            metrics["grid"] = os.path.join(output_dir, "grid.png")
            metrics["code_usage_histogram"] = os.path.join(output_dir, "code_usage.png")
        with open(os.path.join(output_dir, "metrics.json"), "w") as handle:
            json.dump(metrics, handle, indent=2)
        if args.push_to_hub:
            api = HfApi(token=args.hub_token)
            repo_id = api.create_repo(repo_id, private=args.hub_private_repo or None, exist_ok=True).repo_id
            api.upload_folder(repo_id=repo_id, folder_path=output_dir,
                              commit_message="Upload OptVQ model trained with run_train.py",
                              ignore_patterns=["checkpoint-*", "checkpoint-*/**", ".tmp-*", ".tmp-*/**", "logs/**",
                                               "validation/**"])
            metrics["hub_repo_id"] = repo_id
        logger.info("Final metrics: %s", json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
        for failure in run_failures(metrics):
            logger.error("%s: %s", failure["log"], " ".join(failure["reasons"]))
        print(final_summary(metrics, config, output_dir, os.path.join(output_dir, args.logging_dir) if report_to else None,
                            demo=is_demo_setting(args)), flush=True)
    if report_to:
        accelerator.log({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=global_step)
    accelerator.wait_for_everyone()
    end_training(accelerator)
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


def run_failures(metrics: dict) -> list[dict]:
    """The failed verdicts that `metrics` record, most severe first (DIVERGED, then COLLAPSED), each a dict of texts
    for every channel that reports it: `headline`, `details`, `reasons`, `advice` (the summary's lines), `log` (the
    final error log) and `card` (the model card's warning, markdown)."""
    failures = []
    steps, seconds = metrics.get("global_step"), metrics.get("train_time_s", 0.0)
    if metrics.get("diverged"):
        step, last = metrics.get("diverged_at_step"), metrics.get("last_eval")
        kept = (f"The model saved holds the weights after step {steps}, the last one before it (the diverged step's "
                "update was not applied)." if metrics.get("final_model_saved") else
                f"No model was saved: the weights after step {steps} are not finite.")
        if metrics.get("last_checkpoint"):
            kept += f" Last checkpoint: {metrics['last_checkpoint']}."
        failures.append({
            "headline": f"the run DIVERGED at step {step} and was stopped ({seconds:.0f} s).",
            "details": [kept, f"The last evaluation before it: step {last['step']}, PSNR {last['psnr']:.2f} dB, code "
                              f"usage {100 * last['codebook_usage']:.1f} %." if last else
                              "No evaluation ran before it (--validation_steps).",
                        "These weights are not a usable tokenizer. Why:"],
            "reasons": metrics.get("divergence_reasons", []),
            "advice": "Try a lower --learning_rate, or a quantization loss that pulls the latents to their codes "
                      "(quantization_loss=l2) (docs/training.md, 'Is my run healthy?').",
            "log": f"The run DIVERGED at step {step}",
            "card": f"**Warning: this run diverged at step {step}** (it was stopped there; these are the weights of "
                    f"the step before, not a usable tokenizer)",
        })
    if metrics.get("collapsed"):
        failures.append({
            "headline": f"the model COLLAPSED after {steps} steps ({seconds:.0f} s).",
            "details": ["Its reconstructions do not follow its inputs; do not use this model. Why:"],
            "reasons": metrics.get("collapse_reasons", []),
            "advice": "Try a lower --learning_rate or more --max_train_steps (docs/training.md, 'Is my run healthy?').",
            "log": "The final model COLLAPSED",
            "card": "**Warning: this run collapsed** (its reconstructions do not depend on its inputs)",
        })
    return failures


def final_summary(metrics: dict, config, output_dir: str, logging_dir: str | None, demo: bool = False) -> str:
    """The text printed at the end of training: the verdict, what the numbers mean, and which files to open."""
    label = get_quantizer_class(config.quantizer_type).display_name
    where = os.path.abspath(output_dir)
    steps, train_time = metrics["global_step"], metrics["train_time_s"]
    baseline = metrics.get("mean_image_psnr")
    lines = []
    failures = run_failures(metrics)
    for index, failure in enumerate(failures):
        lines += [("\n" + label + " training FAILED: " if index == 0 else "\nAlso: ") + failure["headline"],
                  *failure["details"], *(f"  - {reason}" for reason in failure["reasons"]), failure["advice"]]
    if not failures:
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
                  "      tokens per code (left) and most used first (right): a long, gently falling curve is good; a "
                  "few tall bars mean few codes in use."]
    lines.append(f"  {os.path.join(where, 'metrics.json')}    every number and the verdict (\"collapsed\": "
                 f"{json.dumps(metrics.get('collapsed'))}, \"diverged\": {json.dumps(metrics.get('diverged'))})")
    if metrics.get("final_model_saved", True):
        lines.append(f"  {where}    the model: OptVQModel.from_pretrained({where!r})")
    if logging_dir is not None:
        lines.append(f"  tensorboard --logdir {os.path.abspath(logging_dir)}    loss, PSNR and code usage over time")
    return "\n".join(lines)


def end_training(accelerator):
    """Close the trackers and, with several processes, the process group (a live gloo group can hang at exit)."""
    if accelerator.num_processes > 1:
        # ProcessGroupGloo's destructor (run when its last reference goes, e.g. the DDP model's when train returns)
        # joins gloo's worker threads while holding the GIL; a worker still releasing the tensors of a finished
        # collective needs the GIL for that, and the two deadlock (a rank of a 2-process MNIST run hung so after
        # training, under load). Synchronize, then let the workers go idle (sleeping releases the GIL) first.
        accelerator.wait_for_everyone()
        time.sleep(0.5)
    accelerator.end_training()  # also destroys the process group in recent Accelerate versions
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


COLLAPSE_EXIT_CODE = 3
DIVERGENCE_EXIT_CODE = 4


def exit_status(metrics: dict, fail_on_collapse: bool = False) -> int:
    """The command's exit status for its final metrics: `DIVERGENCE_EXIT_CODE` (4) for a diverged run (always),
    `COLLAPSE_EXIT_CODE` (3) for a collapsed one with `--fail_on_collapse`, else 0."""
    if metrics.get("diverged"):
        return DIVERGENCE_EXIT_CODE
    return COLLAPSE_EXIT_CODE if fail_on_collapse and metrics.get("collapsed") else 0


def cli():
    """The console command `optvq-train` (and `python examples/run_train.py`): `main()` on the command line; exits
    with [`exit_status`]: 4 when the run diverged, 3 when `--fail_on_collapse` is given and the final model
    collapsed, else 0 (the metrics are not returned: a console command exits with the return value of its
    function). With several processes only the main one exits with the verdict's status: a launcher (torchrun,
    `accelerate launch`) stops the other workers as soon as one exits non-zero, and the main process may still be
    writing the model and metrics.json; the main process exits last ([`wait_for_sibling_workers`]), so that the
    launcher reports its status without signalling the others."""
    args = parse_args()
    metrics = main(args)
    if int(os.environ.get("RANK", "0")) != 0:
        sys.exit(0)
    status = exit_status(metrics, args.fail_on_collapse)
    if status and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        wait_for_sibling_workers()  # else the launcher would send the finishing workers SIGTERM
    sys.exit(status)


def wait_for_sibling_workers(timeout: float = 30.0) -> bool:
    """Wait (at most `timeout` seconds) until the other worker processes of this launcher on this machine have
    exited: the processes with the same parent (torchrun's or `accelerate launch`'s agent) and the same command line
    as this one. A launcher stops every worker that is still running as soon as one exits non-zero, so the main
    process, which exits with the verdict's status, leaves last. Reads /proc (Linux); elsewhere it returns at once.
    Returns whether no sibling is left."""
    if not os.path.isdir("/proc/self"):
        return True
    me, parent = os.getpid(), os.getppid()
    try:
        with open(f"/proc/{me}/cmdline", "rb") as handle:
            command_line = handle.read()
    except OSError:
        return True

    def sibling_running() -> bool:
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    state, parent_pid = handle.read().rsplit(")", 1)[1].split()[:2]
                if int(parent_pid) != parent or state in ("Z", "X"):  # a zombie has exited
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if handle.read() == command_line:
                        return True
            except (OSError, ValueError):
                continue  # the process ended while we looked
        return False

    deadline = time.monotonic() + timeout
    while sibling_running():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


if __name__ == "__main__":
    cli()
