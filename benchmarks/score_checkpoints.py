#!/usr/bin/env python
"""Score every checkpoint of a `run_train.py` run on a test split: the evidence behind docs/training.md,
"Reproducing Table 2" (what the VQ row measures).

For each `checkpoint-{step}` folder of `--run_dir` (and the final model, if saved) this loads the model weights,
reconstructs the test images in eval mode (the inference assignment: nearest code) and prints one JSON line:

* `psnr` (mean per-image PSNR over [0, 1] pixels, as `run_eval.py`), `codebook_usage`, `used_codes`, `perplexity`,
  `reconstruction_spread` and run_train's collapse verdict (`collapsed`: the checks of "Is my run healthy?");
* `latent_magnitude`: the largest latent coordinate, and `latent_codebook_ratio`: that over the codebook's largest
  coordinate (run_train's divergence signal on these images: DIVERGED beyond 100);
* `direction_only_share`: the share of latent rows whose nearest code is also the code of largest dot product with
  them, the code a row would get if only its direction counted (what nearest-code assignment becomes for latents
  far outside the codebook).

    python benchmarks/score_checkpoints.py --run_dir vq-run --model_config_name_or_path vq-mnist \
        --dataset_name ../shared/datasets/mnist --steps 20,40,60
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from optvq_hf import OptVQConfig, OptVQImageProcessor, OptVQModel
from optvq_hf.quantization import nearest_assign
from optvq_hf.training import (
    ImagePreprocessor, decode_image_column, diagnose_collapse, divergence_signal, evaluate_reconstruction,
    features_to_rows, find_image_column, list_checkpoints, load_image_dataset, mean_image_psnr, to_pixel_values,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from table2 import DEFAULT_DATA  # noqa: E402  (../shared/datasets/mnist beside the checkout, else ylecun/mnist)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True, help="A run_train.py output folder with checkpoint-* folders.")
    parser.add_argument("--model_config_name_or_path", default=None,
                        help="Preset or folder of the model's config (default: the run's config.json).")
    parser.add_argument("--dataset_name", default=DEFAULT_DATA)
    parser.add_argument("--split", default="test")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Default: the whole split.")
    parser.add_argument("--steps", default=None, help="Comma-separated checkpoint steps (default: every one).")
    parser.add_argument("--batch_size", type=int, default=500)
    return parser.parse_args(argv)


def _config(args) -> OptVQConfig:
    source = args.model_config_name_or_path or args.run_dir
    return OptVQConfig.from_pretrained(source) if os.path.isdir(source) else OptVQConfig.from_preset(source)


@torch.no_grad()
def score(model: OptVQModel, images: torch.Tensor, baseline_psnr: float, batch_size: int) -> dict:
    """The numbers of one set of weights on uint8 `images` (see the module docstring): run_train's own evaluation
    ([`evaluate_reconstruction`]) and collapse verdict, plus the divergence numbers of the latents."""
    metrics, counts = evaluate_reconstruction(model, images, batch_size)
    collapse = diagnose_collapse(psnr=metrics["psnr"], mean_image_psnr=baseline_psnr,
                                 reconstruction_spread=metrics.get("reconstruction_spread"), code_counts=counts)
    model.eval()
    codebook = model.quantizer.codebook
    signal, agree, rows_seen = torch.zeros(3), 0, 0
    for start in range(0, images.shape[0], batch_size):
        latents = model.encode(to_pixel_values(images[start:start + batch_size])).latents
        signal = torch.maximum(signal, divergence_signal(torch.zeros(()), latents, codebook=codebook))
        rows = features_to_rows(latents, model.config.num_heads)
        agree += int((nearest_assign(rows, codebook) == (rows @ codebook.T).argmax(1)).sum())
        rows_seen += rows.shape[0]
    return {"psnr": metrics["psnr"], "codebook_usage": metrics["codebook_usage"],
            "used_codes": int((counts > 0).sum()), "perplexity": metrics["perplexity"],
            "reconstruction_spread": metrics.get("reconstruction_spread"), "collapsed": collapse.collapsed,
            "latent_magnitude": float(signal[1]), "latent_codebook_ratio": float(signal[2]),
            "direction_only_share": agree / max(rows_seen, 1)}


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.manual_seed(0)
    config = _config(args)
    split = load_image_dataset(args.dataset_name, split=args.split)
    if args.max_eval_samples:
        split = split.select(range(min(args.max_eval_samples, len(split))))
    preprocessor = ImagePreprocessor(OptVQImageProcessor.from_model_config(config), config.resolution,
                                     center_crop=True)
    images, _ = decode_image_column(split, find_image_column(split.features), preprocessor)
    baseline = mean_image_psnr(images)
    wanted = {int(step) for step in args.steps.split(",")} if args.steps else None
    folders = [(int(path.rsplit("-", 1)[1]), path) for path in list_checkpoints(args.run_dir)]
    folders = [(step, path) for step, path in folders if wanted is None or step in wanted]
    if os.path.isfile(os.path.join(args.run_dir, "model.safetensors")):
        folders.append(("final", args.run_dir))
    from safetensors.torch import load_file

    model = OptVQModel(config)
    records = []
    for step, folder in folders:
        model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
        record = {"step": step, **score(model, images, baseline, args.batch_size), "mean_image_psnr": baseline,
                  "num_images": int(images.shape[0])}
        records.append(record)
        print(json.dumps(record), flush=True)
    return records


if __name__ == "__main__":
    main()
