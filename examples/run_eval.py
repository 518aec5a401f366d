#!/usr/bin/env python
"""Reconstruction metrics of an OptVQ tokenizer over a dataset split.

    python examples/run_eval.py --model path/to/model --dataset_name ../shared/datasets/mnist --split test \
        --output_dir eval-out [--max_eval_samples 2000] [--batch_size 256] [--metrics psnr,ssim,usage]

Writes `DIR/results.json` (`psnr`, `ssim`, `lpips`, `rfid`, `codebook_usage` as a fraction, `perplexity`,
`dead_codes`, `num_samples`, ...), `DIR/code_usage.png` (per-code usage histogram), `DIR/reconstructions.png`
(originals above reconstructions), and, when `--model` is a local folder, updates its model card (`README.md`):
the `model-index` metadata gets the numbers.

Multi-process: `accelerate launch --num_processes N examples/run_eval.py ...` (or torchrun) splits the images
between processes (image i goes to process i % N) and the metrics reduce exactly over all of them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time

import numpy as np
import torch

logger = logging.getLogger("run_eval")

METRIC_CHOICES = ("psnr", "ssim", "lpips", "rfid", "usage")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Local folder or Hub id of an OptVQModel.")
    parser.add_argument("--revision", default=None, help="Hub revision of --model.")
    parser.add_argument("--dataset_name", required=True,
                        help="Hub dataset id, a local dataset folder (e.g. parquet files per split) or a parquet file.")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--image_column", default=None, help="Image column (default: the first Image feature).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Evaluate the first N images only.")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--metrics", default="psnr,ssim,usage",
                        help=f"Comma-separated subset of {','.join(METRIC_CHOICES)}.")
    parser.add_argument("--lpips_model", default=None,
                        help="LPIPSNetwork folder or Hub id (config.json + model.safetensors); needed for lpips.")
    parser.add_argument("--fid_model", default=None,
                        help="Feature network folder or Hub id for rFID (our Inception-v3 or a transformers model).")
    parser.add_argument("--inference_assignment", choices=("config", "nearest", "sinkhorn"), default="config",
                        help="Token assignment at evaluation; 'config' keeps the model's setting.")
    parser.add_argument("--compare_assignments", action="store_true",
                        help="OptVQ models: also measure how often nearest and Sinkhorn tokens agree and the PSNR of "
                             "each (keys token_agreement, psnr_nearest, psnr_sinkhorn).")
    parser.add_argument("--num_side_by_side", type=int, default=16, help="Images in reconstructions.png.")
    parser.add_argument("--no_model_card", action="store_true", help="Do not touch the model folder's README.md.")
    parser.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRIC_CHOICES]
    if unknown or not metrics:
        parser.error(f"--metrics must be a comma-separated subset of {METRIC_CHOICES}, got {args.metrics!r}.")
    if "lpips" in metrics and not args.lpips_model:
        parser.error("--metrics lpips needs --lpips_model (a local folder or Hub id of an LPIPSNetwork).")
    if "rfid" in metrics and not args.fid_model:
        parser.error("--metrics rfid needs --fid_model (a local folder or Hub id of the feature network).")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}.")
    args.metric_list = metrics
    return args


def load_eval_dataset(name: str, config_name: str | None, split: str):
    """A `datasets.Dataset` split from a Hub id, a local folder or a parquet file."""
    from datasets import load_dataset

    if os.path.isfile(name) and name.endswith(".parquet"):
        return load_dataset("parquet", data_files={split: name}, split=split)
    if os.path.isdir(name):
        parquet = sorted(f for f in os.listdir(name) if f.endswith(".parquet"))
        if parquet:
            files = {}
            for filename in parquet:
                files.setdefault(filename.split("-")[0].split(".")[0], []).append(os.path.join(name, filename))
            if split not in files:
                raise ValueError(f"No {split!r} split in {name}; found {sorted(files)}.")
            return load_dataset("parquet", data_files={split: files[split]}, split=split)
    return load_dataset(name, config_name, split=split)


def find_image_column(dataset, image_column: str | None) -> str:
    from datasets import Image

    if image_column:
        if image_column not in dataset.column_names:
            raise ValueError(f"--image_column {image_column!r} not in the dataset columns {dataset.column_names}.")
        return image_column
    for name, feature in dataset.features.items():
        if isinstance(feature, Image):
            return name
    for name in ("image", "img", "pixel_values"):
        if name in dataset.column_names:
            return name
    raise ValueError(f"No image column found in {dataset.column_names}; pass --image_column.")


def _distributed_state():
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState()
        return state.num_processes, state.process_index, state
    return 1, 0, None


def save_usage_histogram(counts: np.ndarray, path: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    axes[0].bar(np.arange(len(counts)), counts, width=1.0, color="tab:blue")
    axes[0].set_xlabel("code index")
    axes[0].set_ylabel("count")
    axes[0].set_title(title)
    axes[1].plot(np.sort(counts)[::-1], color="tab:orange")
    axes[1].set_yscale("symlog")
    axes[1].set_xlabel("codes, most used first")
    axes[1].set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_side_by_side(originals: torch.Tensor, reconstructions: torch.Tensor, path: str):
    """Originals (top row) above reconstructions (bottom row); inputs in [-1, 1]."""
    from PIL import Image

    def to_row(images):
        unit = ((images.float().clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
        row = torch.cat(list(unit), dim=2)  # (C, H, N*W)
        return row

    grid = torch.cat([to_row(originals), to_row(reconstructions)], dim=1).permute(1, 2, 0).numpy()
    image = Image.fromarray(grid[..., 0], mode="L") if grid.shape[-1] == 1 else Image.fromarray(grid)
    scale = max(1, 128 // originals.shape[-1])
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


def update_model_card(model_dir: str, model, results: dict, dataset_name: str, split: str):
    """Put the numbers into the `model-index` of `model_dir/README.md` (creating the card if missing)."""
    from huggingface_hub import EvalResult, ModelCard

    from optvq_hf.model_card import build_model_card

    card_metrics = {key: results[key] for key in ("psnr", "ssim", "lpips", "rfid", "codebook_usage", "perplexity")
                    if key in results}
    dataset_label = os.path.basename(os.path.normpath(dataset_name)) if os.path.exists(dataset_name) else dataset_name
    readme = os.path.join(model_dir, "README.md")
    if not os.path.isfile(readme):
        card = build_model_card(model.config, num_parameters=model.num_parameters(), eval_results=card_metrics,
                                dataset_name=dataset_label)
        card.save(readme)
        return readme
    card = ModelCard.load(readme)
    new_results = [
        EvalResult(task_type="image-to-image", task_name="Image reconstruction", dataset_type=dataset_label,
                   dataset_name=dataset_label, dataset_split=split, metric_type=name, metric_name=name,
                   metric_value=float(value))
        for name, value in card_metrics.items()
    ]
    kept = [r for r in (card.data.eval_results or [])
            if not (r.dataset_type == dataset_label and (r.dataset_split in (None, split))
                    and r.metric_type in card_metrics)]
    card.data.eval_results = kept + new_results
    if not card.data.model_name:
        card.data.model_name = os.path.basename(os.path.normpath(model_dir))
    # Refresh the human-readable results section too.
    rows = "\n".join(f"| {name} | {value:.4g} |" for name, value in card_metrics.items())
    section = (f"## Evaluation\n\nOn `{dataset_label}` ({split} split, {results['num_samples']} images), measured "
               f"with `examples/run_eval.py`:\n\n| metric | value |\n|---|---|\n{rows}\n\n")
    text = card.text
    start = text.find("## Evaluation\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    else:
        usage = text.find("## Usage")
        text = text[:usage] + section + text[usage:] if usage >= 0 else text + "\n" + section
    card.text = text
    card.save(readme)
    return readme


def main(args=None) -> dict:
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    import optvq_hf  # noqa: F401  (registers the Auto classes)
    from optvq_hf import OptVQImageProcessor, OptVQModel, get_quantizer_class
    import optvq_hf.metrics as optvq_metrics

    world_size, rank, state = _distributed_state()
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if state is not None and args.device is None:
        device = state.device

    model = OptVQModel.from_pretrained(args.model, revision=args.revision).to(device).eval()
    config = model.config
    assignments = get_quantizer_class(config.quantizer_type).inference_assignments
    if args.inference_assignment != "config":
        if args.inference_assignment not in assignments:
            raise ValueError(f"--inference_assignment {args.inference_assignment} is not one of the assignments of a "
                             f"{config.quantizer_type!r} model {assignments}.")
        model.quantizer.inference_assignment = args.inference_assignment
    try:
        processor = OptVQImageProcessor.from_pretrained(args.model, revision=args.revision)
    except (OSError, ValueError):
        processor = OptVQImageProcessor.from_model_config(config)

    dataset = load_eval_dataset(args.dataset_name, args.dataset_config_name, args.split)
    image_column = find_image_column(dataset, args.image_column)
    if args.max_eval_samples is not None:
        dataset = dataset.select(range(min(args.max_eval_samples, len(dataset))))
    num_images = len(dataset)
    if num_images == 0:
        raise ValueError("The evaluation split is empty.")
    indices = list(range(rank, num_images, world_size))

    # Distributed evaluate modules gather per-image rows through files; one process keeps them in memory.
    # The same id on every process (it names the shared cache files); distinct per output folder.
    experiment_id = hashlib.sha1(f"{os.path.abspath(args.output_dir)}|{args.model}|{args.split}"
                                 .encode()).hexdigest()[:16]
    common = dict(num_process=world_size, process_id=rank, experiment_id=experiment_id,
                  keep_in_memory=world_size == 1)
    metrics = {}
    if "psnr" in args.metric_list:
        metrics["psnr"] = optvq_metrics.load("psnr", **common)
    if "ssim" in args.metric_list:
        metrics["ssim"] = optvq_metrics.load("ssim", **common)
    if "lpips" in args.metric_list:
        metrics["lpips"] = optvq_metrics.load("lpips", network=args.lpips_model, device=device, **common)
    if "rfid" in args.metric_list:
        metrics["rfid"] = optvq_metrics.load("rfid", feature_extractor=args.fid_model, device=device, **common)
    if "usage" in args.metric_list:
        metrics["usage"] = optvq_metrics.load("codebook_usage", codebook_size=config.codebook_size, **common)
    compare = args.compare_assignments and "sinkhorn" in assignments
    if args.compare_assignments and not compare:
        logger.warning("--compare_assignments needs a Sinkhorn inference assignment; skipped for %r.",
                       config.quantizer_type)
    if compare:
        metrics["psnr_nearest"] = optvq_metrics.load("psnr", **{**common, "experiment_id": experiment_id + "n"})
        metrics["psnr_sinkhorn"] = optvq_metrics.load("psnr", **{**common, "experiment_id": experiment_id + "s"})
        agreement = torch.zeros(2, dtype=torch.float64)  # (equal tokens, tokens)

    side_originals, side_reconstructions = [], []
    start_time = time.perf_counter()
    for start in range(0, len(indices), args.batch_size):
        rows = dataset[indices[start:start + args.batch_size]][image_column]
        pixel_values = processor(rows, return_tensors="pt").pixel_values.to(device)
        with torch.no_grad():
            output = model(pixel_values)
        reconstruction = output.reconstruction.float().clamp(-1, 1).cpu()
        originals = pixel_values.float().cpu()
        for name in ("psnr", "ssim", "lpips", "rfid"):
            if name in metrics:
                metrics[name].add_batch(predictions=reconstruction, references=originals)
        if "usage" in metrics:
            metrics["usage"].add_batch(predictions=output.token_ids.cpu())
        if compare:
            quantizer = model.quantizer
            saved = quantizer.inference_assignment
            with torch.no_grad():
                latents = model.encode_latents(pixel_values)
                decoded = {}
                for assignment in ("nearest", "sinkhorn"):
                    quantizer.inference_assignment = assignment
                    quantized = quantizer(latents)
                    decoded[assignment] = (quantized.token_ids, model.decode(quantized.quantized).float().clamp(-1, 1))
            quantizer.inference_assignment = saved
            agreement += torch.tensor([float((decoded["nearest"][0] == decoded["sinkhorn"][0]).sum()),
                                       float(decoded["nearest"][0].numel())], dtype=torch.float64)
            for assignment in ("nearest", "sinkhorn"):
                metrics[f"psnr_{assignment}"].add_batch(predictions=decoded[assignment][1].cpu(), references=originals)
        if rank == 0 and sum(t.shape[0] for t in side_originals) < args.num_side_by_side:
            side_originals.append(originals)
            side_reconstructions.append(reconstruction)
    elapsed = time.perf_counter() - start_time

    if compare and world_size > 1:
        import torch.distributed as dist

        agreement_device = agreement.to(device)
        dist.all_reduce(agreement_device)
        agreement = agreement_device.cpu()

    computed = {name: metric.compute() for name, metric in metrics.items()}
    if rank != 0:
        return {}

    results: dict = {"num_samples": num_images}
    for name in ("psnr", "ssim", "lpips", "rfid"):
        if name in computed:
            results[name] = computed[name][name]
            if computed[name]["num_samples"] != num_images:
                raise RuntimeError(f"{name} saw {computed[name]['num_samples']} images, expected {num_images}.")
    if "psnr" in computed:
        results["psnr_of_mean_mse"] = computed["psnr"]["psnr_of_mean_mse"]
    counts = None
    if "usage" in computed:
        usage = computed["usage"]
        counts = np.asarray(usage.pop("code_counts"))
        results.update(codebook_usage=usage["codebook_usage"], perplexity=usage["perplexity"],
                       dead_codes=usage["dead_codes"], used_codes=usage["used_codes"], num_tokens=usage["num_tokens"])
    if compare:
        results["token_agreement"] = float(agreement[0] / agreement[1])
        results["psnr_nearest"] = computed["psnr_nearest"]["psnr"]
        results["psnr_sinkhorn"] = computed["psnr_sinkhorn"]["psnr"]
        results["sinkhorn_batch_size"] = args.batch_size
    results.update(
        model=args.model,
        dataset=args.dataset_name,
        split=args.split,
        quantizer_type=config.quantizer_type,
        inference_assignment=model.quantizer.inference_assignment,
        codebook_size=config.codebook_size,
        num_processes=world_size,
        eval_seconds=round(elapsed, 2),
    )

    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    if counts is not None:
        np.save(os.path.join(args.output_dir, "code_counts.npy"), counts)
        save_usage_histogram(counts, os.path.join(args.output_dir, "code_usage.png"),
                             f"code usage {results['codebook_usage']:.1%}, perplexity {results['perplexity']:.1f}")
    if side_originals:
        count = args.num_side_by_side
        save_side_by_side(torch.cat(side_originals)[:count], torch.cat(side_reconstructions)[:count],
                          os.path.join(args.output_dir, "reconstructions.png"))
    if os.path.isdir(args.model) and not args.no_model_card:
        readme = update_model_card(args.model, model, results, args.dataset_name, args.split)
        logger.info("Updated the model card %s", readme)
    summary = {k: v for k, v in results.items() if isinstance(v, (int, float))}
    logger.info("Results: %s", json.dumps(summary))
    return results


def cli():
    """The console command `optvq-eval`: `main()`, whose results are not returned (a console command exits with
    the return value of its function)."""
    main()


if __name__ == "__main__":
    main()
    sys.exit(0)
