#!/usr/bin/env python
"""Reconstruction metrics of an OptVQ tokenizer over a dataset split.

    python examples/run_eval.py --model path/to/model --dataset_name ../shared/datasets/mnist --split test \
        --output_dir eval-out [--max_eval_samples 2000] [--batch_size 256] [--metrics psnr,ssim,usage]

The data is read as `examples/run_train.py` reads it (`optvq_hf.training.load_image_dataset`: Hub id, local folder,
file or stream) and preprocessed by the model's processor; unreadable images are skipped and counted. The numbers are
`optvq_hf.metrics`' (the evaluate modules, the same definitions as training's evaluation).

Writes `DIR/results.json` (`psnr`, `ssim`, `lpips`, `rfid`, `codebook_usage` as a fraction, `perplexity`,
`dead_codes`, `num_samples`, `skipped_images`, `metric_convention`, ...), `DIR/code_usage.png` (per-code usage histogram), `DIR/reconstructions.png`
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
                        help="Hub dataset id, a local folder (data files such as parquet per split, or images), a "
                             "save_to_disk folder, or one parquet / arrow file.")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--image_column", default=None, help="Image column (default: the first Image feature).")
    parser.add_argument("--streaming", action="store_true", help="Stream the dataset (no local copy).")
    parser.add_argument("--cache_dir", default=None, help="datasets cache folder.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Evaluate the first N images only.")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--metrics", default="psnr,ssim,usage",
                        help=f"Comma-separated subset of {','.join(METRIC_CHOICES)}.")
    parser.add_argument("--lpips_model", default=None,
                        help="LPIPS weights, as run_train's --perceptual_model: an LPIPSNetwork folder or Hub id "
                             "(config.json + model.safetensors), or lpips_vgg.safetensors (a file or a folder holding "
                             "it); needed for lpips.")
    parser.add_argument("--fid_model", default=None,
                        help="Feature network folder or Hub id for rFID (our Inception-v3 or a transformers model).")
    parser.add_argument("--metric_convention", choices=("rgb", "paper"), default="rgb",
                        help="How PSNR and SSIM are scored: 'rgb' (every channel) or 'paper' (the OptVQ paper's "
                             "tables: Y channel of BT.601, as pyiqa; see docs/evaluation.md). Stored in results.json "
                             "and the model card.")
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
    if args.max_eval_samples is not None and args.max_eval_samples < 1:
        parser.error(f"--max_eval_samples must be >= 1 when given, got {args.max_eval_samples}.")
    args.metric_list = metrics
    return args


def _distributed_state():
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from optvq_hf.training import distributed_state

        # On CPU, Accelerate sets up gloo only when asked for the CPU; else every process would evaluate everything.
        state = distributed_state()
        if state.num_processes != int(os.environ["WORLD_SIZE"]):
            raise RuntimeError(f"Launched as {os.environ['WORLD_SIZE']} processes, but Accelerate set up "
                               f"{state.num_processes} ({state.distributed_type}).")
        return state.num_processes, state.process_index, state
    return 1, 0, None


def update_model_card(model_dir: str, model, results: dict, dataset_name: str, split: str):
    """Put the numbers into the `model-index` of `model_dir/README.md` (creating the card if missing)."""
    from huggingface_hub import EvalResult, ModelCard

    from optvq_hf.model_card import CONVENTION_METRICS, build_model_card, convention_note

    card_metrics = {key: results[key] for key in ("psnr", "ssim", "lpips", "rfid", "codebook_usage", "perplexity")
                    if key in results}
    convention = results.get("metric_convention", "rgb")
    dataset_label = os.path.basename(os.path.normpath(dataset_name)) if os.path.exists(dataset_name) else dataset_name
    readme = os.path.join(model_dir, "README.md")
    if not os.path.isfile(readme):
        card = build_model_card(model.config, num_parameters=model.num_parameters(), eval_results=card_metrics,
                                dataset_name=dataset_label, score_convention=convention)
        card.save(readme)
        return readme
    card = ModelCard.load(readme)
    new_results = [
        EvalResult(task_type="image-to-image", task_name="Image reconstruction", dataset_type=dataset_label,
                   dataset_name=dataset_label, dataset_split=split, metric_type=name, metric_name=name,
                   metric_value=float(value), metric_config=convention if name in CONVENTION_METRICS else None)
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
               f"with `examples/run_eval.py`:\n\n| metric | value |\n|---|---|\n{rows}\n\n"
               + convention_note(card_metrics, convention))
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
    from optvq_hf.metrics import save_reconstruction_grid, save_usage_histogram
    from optvq_hf.training import (
        ImagePreprocessor,
        find_image_column,
        iter_image_batches,
        load_image_dataset,
        to_pixel_values,
    )

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
    processor = OptVQImageProcessor.from_pretrained_or_model_config(args.model, config, revision=args.revision)

    dataset = load_image_dataset(args.dataset_name, args.dataset_config_name, streaming=args.streaming,
                                 cache_dir=args.cache_dir, split=args.split)
    image_column = find_image_column(dataset.features, args.image_column)
    if args.max_eval_samples is not None:
        dataset = dataset.take(args.max_eval_samples) if args.streaming else dataset.select(
            range(min(args.max_eval_samples, len(dataset))))
    # The processor's own resize and center crop; unreadable images are skipped and counted.
    preprocessor = ImagePreprocessor(processor)

    # Distributed evaluate modules gather per-image rows through files; one process keeps them in memory.
    # The same id on every process (it names the shared cache files); distinct per output folder.
    experiment_id = hashlib.sha1(f"{os.path.abspath(args.output_dir)}|{args.model}|{args.split}"
                                 .encode()).hexdigest()[:16]
    common = dict(num_process=world_size, process_id=rank, experiment_id=experiment_id,
                  keep_in_memory=world_size == 1)
    metrics = {}
    scored = dict(common, convention=args.metric_convention)  # PSNR and SSIM
    if "psnr" in args.metric_list:
        metrics["psnr"] = optvq_metrics.load("psnr", **scored)
    if "ssim" in args.metric_list:
        metrics["ssim"] = optvq_metrics.load("ssim", **scored)
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
        metrics["psnr_nearest"] = optvq_metrics.load("psnr", **{**scored, "experiment_id": experiment_id + "n"})
        metrics["psnr_sinkhorn"] = optvq_metrics.load("psnr", **{**scored, "experiment_id": experiment_id + "s"})
        agreement = torch.zeros(2, dtype=torch.float64)  # (equal tokens, tokens)

    side_originals, side_reconstructions = [], []
    seen = torch.zeros(2, dtype=torch.float64)  # (images evaluated, unreadable images skipped) on this process
    start_time = time.perf_counter()
    for images, num_skipped in iter_image_batches(dataset, image_column, preprocessor, args.batch_size, rank,
                                                  world_size):
        seen[1] += num_skipped
        if images is None:
            continue
        seen[0] += images.shape[0]
        pixel_values = to_pixel_values(images).to(device)
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

    totals = torch.cat([seen, agreement if compare else torch.zeros(2, dtype=torch.float64)])
    if world_size > 1:
        import torch.distributed as dist

        reduced = totals.to(device)
        dist.all_reduce(reduced)
        totals = reduced.cpu()
    num_images, num_skipped, agreement = int(totals[0]), int(totals[1]), totals[2:]
    if num_images == 0:
        raise ValueError(f"No readable image in the evaluation split ({num_skipped} unreadable).")

    computed = {name: metric.compute() for name, metric in metrics.items()}
    if rank != 0:
        return {}

    results: dict = {"num_samples": num_images, "skipped_images": num_skipped,
                     "metric_convention": args.metric_convention}
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
        save_usage_histogram(counts, os.path.join(args.output_dir, "code_usage.png"), f"{args.split} split")
    if side_originals:
        count = args.num_side_by_side
        originals = torch.cat(side_originals)[:count]
        save_reconstruction_grid(originals, torch.cat(side_reconstructions)[:count],
                                 os.path.join(args.output_dir, "reconstructions.png"),
                                 scale=max(1, 128 // originals.shape[-1]), padding=0)
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
