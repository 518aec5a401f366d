#!/usr/bin/env python
"""Train a small class-conditional autoregressive prior (a transformers causal LM) on OptVQ image tokens.

Every training example is one LM sequence::

    [label token] [begin-of-image] [image tokens: raster order, heads innermost]

with ids: labels `0..C-1`, begin-of-image `C`, image tokens from `offset = C + 1` on (`OptVQProcessor`). The LM is a
`LlamaForCausalLM` built from a config (no download). After training it samples `--num_samples` images with
`generate` (prompt = label + begin-of-image; a logits processor keeps every step inside the image-token range of the
head being generated), decodes them with the tokenizer to `OUTPUT_DIR/samples.png` (one row per label), and saves:

* `OUTPUT_DIR/` the LM (`save_pretrained`; its `config.json` records the sequence layout under `optvq_*` keys),
* `OUTPUT_DIR/image_tokenizer/` the OptVQ tokenizer and its `OptVQProcessor` (`processor_config.json`),
* `OUTPUT_DIR/samples.png`, `OUTPUT_DIR/samples.json` (labels and generated sequences), `OUTPUT_DIR/train_log.json`.

Multi-head tokenizers: by default a position's heads are consecutive tokens (heads innermost, one LM step each);
`--head_vocabulary per_head` gives each head its own id range; `--factorized` uses one LM position per grid position
and predicts its heads in turn from that position's hidden state (`factorized_logits`, `sample_factorized`).

Input: images (`--dataset_name`, tokenized up front by the tokenizer) or a dataset already tokenized by
`examples/tokenize_dataset.py` (`--token_dataset`: a folder or Hub id; its card names the grid, the heads, the
codebook and the tokenizer, which decodes the samples unless `--tokenizer` names another folder of the same model).

Examples::

    # MNIST (parquet from ../shared when present, else `--dataset_name synthetic-digits`), tokenizer trained before
    python examples/train_ar_prior.py --tokenizer runs/optvq-mnist --dataset_name mnist --output_dir runs/ar-mnist \
        --max_train_steps 2000

    # Everything from scratch in a few minutes on CPU: a quick tokenizer first, then the prior
    python examples/train_ar_prior.py --train_tokenizer_steps 300 --dataset_name synthetic-digits \
        --output_dir runs/ar-digits --max_train_steps 500

    # On token ids written by examples/tokenize_dataset.py (with --keep_columns label)
    python examples/train_ar_prior.py --token_dataset runs/mnist-tokens --output_dir runs/ar-mnist
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import random
import time

import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

from optvq_hf import ImageSequenceLayout, OptVQConfig, OptVQImageProcessor, OptVQModel, OptVQProcessor

DEFAULT_MNIST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "datasets", "mnist")


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def synthetic_digits(num_samples: int, seed: int = 0, size: int = 28) -> tuple[list[Image.Image], list[int]]:
    """A tiny MNIST-like set drawn with Pillow's bundled font: white digits 0-9 on black, randomly sized, shifted
    and rotated. Needs no download."""
    rng = random.Random(seed)
    images, labels = [], []
    for index in range(num_samples):
        label = index % 10
        font = ImageFont.load_default(size=rng.randint(int(size * 0.6), int(size * 0.85)))
        canvas = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(canvas)
        left, top, right, bottom = draw.textbbox((0, 0), str(label), font=font)
        x = (size - (right - left)) / 2 - left + rng.uniform(-2, 2)
        y = (size - (bottom - top)) / 2 - top + rng.uniform(-2, 2)
        draw.text((x, y), str(label), fill=255, font=font, stroke_width=rng.choice([0, 1]), stroke_fill=255)
        canvas = canvas.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR)
        images.append(canvas.filter(ImageFilter.GaussianBlur(0.5)))
        labels.append(label)
    return images, labels


def load_labelled_images(args) -> tuple[list[Image.Image], list[int], int]:
    """`(images, labels, num_classes)` of the training set named by `--dataset_name`."""
    name = args.dataset_name
    if name == "synthetic-digits":
        images, labels = synthetic_digits(args.max_train_samples or 2000, seed=args.seed)
        return images, labels, 10
    from datasets import load_dataset

    if name == "mnist":
        data_dir = args.data_dir or DEFAULT_MNIST_DIR
        train_file = os.path.join(data_dir, "train-00000-of-00001.parquet")
        if not os.path.isfile(train_file):
            raise SystemExit(
                f"MNIST parquet not found at {train_file}; pass --data_dir, or use --dataset_name synthetic-digits."
            )
        dataset = load_dataset("parquet", data_files={"train": train_file}, split="train")
    elif os.path.isdir(name):
        dataset = load_dataset(name, split="train")
    else:  # a Hub dataset id (needs network or the local cache)
        dataset = load_dataset(name, split="train")
    if args.max_train_samples is not None:
        dataset = dataset.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(dataset))))
    for column in (args.image_column, args.label_column):
        if column not in dataset.column_names:
            raise SystemExit(f"Column {column!r} not in the dataset (columns: {dataset.column_names}).")
    labels = [int(label) for label in dataset[args.label_column]]
    feature = dataset.features[args.label_column]
    num_classes = getattr(feature, "num_classes", None) or (max(labels) + 1)
    return list(dataset[args.image_column]), labels, num_classes


def load_token_dataset(args) -> tuple[torch.LongTensor, list[int], int, dict]:
    """`(token_grids (N, num_heads, h, w), labels, num_classes, card metadata)` of a dataset written by
    `examples/tokenize_dataset.py`: a local folder (read with the parquet builder) or a Hub dataset id."""
    import numpy as np
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    source = args.token_dataset
    if os.path.isdir(source):
        card = DatasetCard.load(os.path.join(source, "README.md"))
        files = os.path.join(source, "data", f"{args.token_split}-*.parquet")
        dataset = load_dataset("parquet", data_files={args.token_split: files}, split=args.token_split)
    else:  # a Hub dataset id (needs network or the local cache)
        card = DatasetCard.load(source, repo_type="dataset")
        dataset = load_dataset(source, split=args.token_split)
    meta = card.data.to_dict().get("optvq")
    if not meta:
        raise SystemExit(f"{source} has no `optvq` metadata in its README.md: not written by tokenize_dataset.py?")
    if args.label_column not in dataset.column_names:
        raise SystemExit(f"Column {args.label_column!r} not in the token dataset (columns: {dataset.column_names}); "
                         f"tokenize with --keep_columns {args.label_column}.")
    if args.max_train_samples is not None:
        dataset = dataset.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(dataset))))
    flat = torch.from_numpy(np.asarray(dataset.with_format("numpy")["token_ids"], dtype=np.int64))
    layout = ImageSequenceLayout(codebook_size=meta["codebook_size"], num_heads=meta["num_heads"])
    grids = layout.sequence_to_tokens(flat, tuple(meta["grid_size"]))  # checks length and id range
    labels = [int(label) for label in dataset[args.label_column]]
    num_classes = getattr(dataset.features[args.label_column], "num_classes", None) or (max(labels) + 1)
    return grids, labels, num_classes, meta


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------
def train_quick_tokenizer(images, args) -> OptVQModel:
    """Train a small OptVQ tokenizer (the paper's MNIST CNN, smaller codebook) for `--train_tokenizer_steps` steps
    with an L1 + quantization loss. For a real tokenizer use `examples/run_train.py`."""
    torch.manual_seed(args.seed)
    channels = 1 if images[0].mode in ("L", "1") else 3
    config = OptVQConfig.from_preset(
        "optvq-mnist", in_channels=channels, out_channels=channels, codebook_size=args.tokenizer_codebook_size,
        num_heads=args.tokenizer_num_heads, embed_dim=args.tokenizer_num_heads * max(2, 8 // args.tokenizer_num_heads),
        resolution=args.resolution or 32,
    )
    model = OptVQModel(config)
    processor = OptVQProcessor.from_model(model)
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for step in range(args.train_tokenizer_steps):
        batch = pixels[torch.randint(0, len(pixels), (args.train_batch_size,))]
        output = model(batch)
        loss = (output.reconstruction - batch).abs().mean() + output.quantization_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % max(1, args.train_tokenizer_steps // 5) == 0 or step == args.train_tokenizer_steps - 1:
            print(f"tokenizer step {step}: loss {loss.item():.4f} usage {output.codebook_usage.item():.2f}")
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------
class ImageTokenLogitsProcessor(LogitsProcessor):
    """Restricts each generated position to the image-token range of the head it holds (the whole image range
    with a shared head vocabulary, head `k`'s range with `head_vocabulary="per_head"`), so every sample decodes.

    Args:
        layout (`ImageSequenceLayout`): the processor's layout.
        prompt_length (`int`): length of the prompt (label + begin-of-image); generated position `t` holds head
            `t % num_heads`.
    """

    def __init__(self, layout, prompt_length: int):
        self.prompt_length = prompt_length
        self.ranges = [layout.image_token_range(head) for head in range(layout.num_heads)]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        low, high = self.ranges[step % len(self.ranges)]
        masked = torch.full_like(scores, float("-inf"))
        masked[:, low:high] = scores[:, low:high]
        return masked


@torch.no_grad()
def sample_sequences(lm: LlamaForCausalLM, processor: OptVQProcessor, labels: list[int], grid_size, boi_token_id: int,
                     temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> torch.LongTensor:
    """Sample image sequences `(K, 1 + L)` (begin-of-image + image tokens) for class `labels` with `generate`."""
    layout = processor.layout
    num_image_tokens = layout.sequence_length(grid_size) - layout.num_special_tokens
    prompts = torch.tensor([[label, boi_token_id] for label in labels], dtype=torch.long, device=lm.device)
    torch.manual_seed(seed)
    generated = lm.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=num_image_tokens,
        min_new_tokens=num_image_tokens,
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        logits_processor=LogitsProcessorList([ImageTokenLogitsProcessor(layout, prompts.shape[1])]),
        eos_token_id=None,
        pad_token_id=boi_token_id,
    )
    return generated[:, 1:].cpu()  # drop the label: what is left is the processor's layout


# ----------------------------------------------------------------------------------------------------------------
# Factorized multi-head prior: one LM position per grid position, its heads predicted in turn
# ----------------------------------------------------------------------------------------------------------------
def _head_masks(layout, vocab_size: int, device) -> torch.Tensor:
    """`(num_heads, vocab_size)` additive masks: 0 inside head `k`'s id range, -inf elsewhere."""
    masks = torch.full((layout.num_heads, vocab_size), float("-inf"), device=device)
    for head in range(layout.num_heads):
        low, high = layout.image_token_range(head)
        masks[head, low:high] = 0.0
    return masks


def factorized_logits(lm: LlamaForCausalLM, labels: torch.LongTensor, rows: torch.LongTensor, boi_token_id: int,
                      layout) -> torch.FloatTensor:
    """Logits `(B, P, num_heads, V)` of a factorized prior for rows `(B, P, num_heads)` (per-head vocabulary).

    The LM reads `[label, begin-of-image, cell_1, ..., cell_{P-1}]`, where a cell's input embedding is the sum of
    its heads' token embeddings. The hidden state `h_t` that precedes cell `t` predicts its heads in turn: head `k`
    from `h_t + sum_{j<k} embed(x_j)` through the (tied) LM head, restricted to head `k`'s id range.
    """
    embed = lm.get_input_embeddings()
    prefix = embed(torch.stack([labels, torch.full_like(labels, boi_token_id)], dim=1))  # (B, 2, D)
    cells = embed(rows)  # (B, P, H, D)
    inputs = torch.cat([prefix, cells[:, :-1].sum(dim=2)], dim=1)  # (B, P + 1, D)
    hidden = lm.model(inputs_embeds=inputs).last_hidden_state[:, 1:]  # (B, P, D): the state before each cell
    earlier_heads = cells.cumsum(dim=2) - cells  # sum over heads j < k of the same cell (teacher forcing)
    logits = lm.lm_head(hidden[:, :, None] + earlier_heads)  # (B, P, H, V)
    return logits.float() + _head_masks(layout, logits.shape[-1], logits.device)


def cache_keyword(model) -> str:
    """The keyword under which this transformers version's decoder takes its KV cache: `cache` (newer releases, where
    `past_key_values` is deprecated, and removed in 5.40) or `past_key_values` (older 5.x releases)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def sample_factorized(lm: LlamaForCausalLM, processor: OptVQProcessor, labels: list[int], grid_size, boi_token_id: int,
                      temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> torch.LongTensor:
    """Sample factorized rows `(K, h * w, num_heads)` with the LM's KV cache: one forward per grid position, its
    heads drawn in turn (`generate` emits one token per step, so this loop replaces it for the factorized prior)."""
    layout = processor.layout
    torch.manual_seed(seed)
    embed = lm.get_input_embeddings()
    masks = _head_masks(layout, lm.config.vocab_size, lm.device)
    label_ids = torch.tensor(labels, dtype=torch.long, device=lm.device)
    inputs = embed(torch.stack([label_ids, torch.full_like(label_ids, boi_token_id)], dim=1))
    from transformers import DynamicCache

    cache = {cache_keyword(lm.model): DynamicCache(config=lm.config)}  # filled in place by every forward
    output = lm.model(inputs_embeds=inputs, use_cache=True, **cache)
    rows = []
    for position in range(grid_size[0] * grid_size[1]):
        hidden = output.last_hidden_state[:, -1]
        cell = []
        context = torch.zeros_like(hidden)
        for head in range(layout.num_heads):
            logits = lm.lm_head(hidden + context).float() / max(temperature, 1e-5) + masks[head]
            if top_k is not None:
                threshold = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < threshold, float("-inf"))
            token = torch.multinomial(logits.softmax(dim=-1), 1)[:, 0]
            cell.append(token)
            context = context + embed(token)
        rows.append(torch.stack(cell, dim=1))
        if position + 1 < grid_size[0] * grid_size[1]:
            cell_embedding = embed(rows[-1]).sum(dim=1, keepdim=True)
            output = lm.model(inputs_embeds=cell_embedding, use_cache=True, **cache)
    return torch.stack(rows, dim=1).cpu()


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Paste equally sized images into a grid with `columns` per row (2-pixel gaps)."""
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new(images[0].mode, (columns * (width + 2) + 2, rows * (height + 2) + 2), 128)
    for index, image in enumerate(images):
        grid.paste(image, (2 + (index % columns) * (width + 2), 2 + (index // columns) * (height + 2)))
    return grid


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", default="mnist",
                      help="'mnist' (parquet in --data_dir), 'synthetic-digits' (bundled), a local dataset folder or "
                           "a Hub id")
    data.add_argument("--data_dir", default=None, help=f"folder of the MNIST parquet files (default {DEFAULT_MNIST_DIR})")
    data.add_argument("--image_column", default="image")
    data.add_argument("--label_column", default="label")
    data.add_argument("--token_dataset", default=None,
                      help="train on token ids written by examples/tokenize_dataset.py (a folder or Hub dataset id) "
                           "instead of tokenizing --dataset_name; needs its --label_column")
    data.add_argument("--token_split", default="train", help="split of --token_dataset")
    data.add_argument("--max_train_samples", type=int, default=10000)
    data.add_argument("--resolution", type=int, default=None,
                      help="image size fed to the tokenizer (default: the tokenizer's config.resolution)")
    tok = parser.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer", default=None,
                     help="folder of a trained OptVQModel (save_pretrained); with --token_dataset, default: the "
                          "tokenizer its card names")
    tok.add_argument("--train_tokenizer_steps", type=int, default=0,
                     help="without --tokenizer: train a small tokenizer for this many steps first")
    tok.add_argument("--tokenizer_codebook_size", type=int, default=256)
    tok.add_argument("--tokenizer_num_heads", type=int, default=1)
    tok.add_argument("--head_vocabulary", choices=["shared", "per_head"], default=None,
                     help="multi-head tokenizers: one id range shared by all heads (default), or one range per head "
                          "(default and required with --factorized)")
    tok.add_argument("--factorized", action="store_true",
                     help="one LM position per grid position, predicting its heads' tokens in turn (sequences "
                          "num_heads times shorter); sampled with a KV-cache loop instead of `generate`")
    lm = parser.add_argument_group("language model")
    lm.add_argument("--hidden_size", type=int, default=128)
    lm.add_argument("--num_layers", type=int, default=4)
    lm.add_argument("--num_attention_heads", type=int, default=4)
    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", required=True)
    train.add_argument("--max_train_steps", type=int, default=1000)
    train.add_argument("--train_batch_size", type=int, default=32)
    train.add_argument("--learning_rate", type=float, default=1e-3)
    train.add_argument("--warmup_steps", type=int, default=50)
    train.add_argument("--weight_decay", type=float, default=0.01)
    train.add_argument("--logging_steps", type=int, default=50)
    train.add_argument("--seed", type=int, default=0)
    sample = parser.add_argument_group("sampling")
    sample.add_argument("--num_samples", type=int, default=20, help="images to sample (labels cycle 0..C-1)")
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--top_k", type=int, default=None)
    args = parser.parse_args(argv)
    if args.token_dataset is not None and args.train_tokenizer_steps > 0:
        parser.error("--token_dataset holds ids of a trained tokenizer; --train_tokenizer_steps does not apply")
    if args.token_dataset is None and args.tokenizer is None and args.train_tokenizer_steps <= 0:
        parser.error("pass --tokenizer PATH (a trained OptVQModel folder), --train_tokenizer_steps N or "
                     "--token_dataset PATH")
    if args.factorized and args.head_vocabulary == "shared":
        parser.error("--factorized needs --head_vocabulary per_head (a cell's input is the sum of its heads' "
                     "embeddings, so each head needs its own ids)")
    if args.head_vocabulary is None:
        args.head_vocabulary = "per_head" if args.factorized else "shared"
    if args.max_train_steps < 1 or args.num_samples < 1:
        parser.error("--max_train_steps and --num_samples must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    if args.token_dataset is not None:
        token_grids, labels, num_classes, token_meta = load_token_dataset(args)
        print(f"{len(token_grids)} token sequences from {args.token_dataset}, {num_classes} classes")
        tokenizer = OptVQModel.from_pretrained(args.tokenizer or token_meta["tokenizer"]).eval()
        found = (tokenizer.config.codebook_size, tokenizer.config.num_heads)
        if found != (token_meta["codebook_size"], token_meta["num_heads"]):
            raise SystemExit(f"The tokenizer has (codebook_size, num_heads) {found}, the token dataset "
                             f"{(token_meta['codebook_size'], token_meta['num_heads'])}.")
        args.resolution = token_meta["image_size"][0]
    else:
        images, labels, num_classes = load_labelled_images(args)
        print(f"{len(images)} training images, {num_classes} classes")
        tokenizer = (OptVQModel.from_pretrained(args.tokenizer).eval() if args.tokenizer is not None
                     else train_quick_tokenizer(images, args))
    # Vocabulary: labels 0..C-1, begin-of-image C, image tokens from C + 1.
    boi_token_id = num_classes
    processor_kwargs = dict(offset=num_classes + 1, head_vocabulary=args.head_vocabulary)
    if args.factorized:  # rows (B, h * w, num_heads); the prior adds label and begin-of-image embeddings itself
        processor_kwargs["factorized"] = True
    else:
        processor_kwargs["boi_token_id"] = boi_token_id
    size = args.resolution or tokenizer.config.resolution
    image_processor = OptVQImageProcessor.from_model_config(
        tokenizer.config, size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    processor = OptVQProcessor.from_model(tokenizer, image_processor=image_processor, **processor_kwargs)

    if args.token_dataset is not None:
        encoded = {"input_ids": processor.layout.tokens_to_sequence(token_grids),
                   "image_grid_size": torch.tensor([token_grids.shape[-2:]] * len(token_grids))}
    else:
        encoded = processor(images=images, return_tensors="pt")
    label_ids = torch.tensor(labels, dtype=torch.long)
    if args.factorized:
        sequences = encoded["input_ids"]  # (N, h * w, num_heads)
        sequence_length = 1 + sequences.shape[1]  # label, begin-of-image, cells 1..P-1
    else:
        sequences = torch.cat([label_ids[:, None], encoded["input_ids"]], dim=1)
        sequence_length = sequences.shape[1]
    grid_size = tuple(encoded["image_grid_size"][0].tolist())
    print(f"tokenized to LM sequences of length {sequence_length} (grid {grid_size}, {tokenizer.config.num_heads} "
          f"head(s)), vocabulary {processor.vocab_size}; {time.perf_counter() - started:.1f}s")

    config = LlamaConfig(
        vocab_size=processor.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_attention_heads,
        max_position_embeddings=sequence_length,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=boi_token_id,
    )
    # Everything needed to turn a sample back into an image travels with the LM.
    config.optvq_num_labels = num_classes
    config.optvq_boi_token_id = boi_token_id
    config.optvq_offset = num_classes + 1
    config.optvq_head_vocabulary = args.head_vocabulary
    config.optvq_factorized = args.factorized
    config.optvq_grid_size = list(grid_size)
    config.optvq_tokenizer = "image_tokenizer"
    lm = LlamaForCausalLM(config)
    print(f"LM: {lm.num_parameters() / 1e6:.2f}M parameters")

    optimizer = torch.optim.AdamW(lm.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / max(1, args.warmup_steps))
        * 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.max_train_steps))),
    )
    generator = torch.Generator().manual_seed(args.seed)
    log = []
    lm.train()
    train_started = time.perf_counter()
    for step in range(args.max_train_steps):
        indices = torch.randint(0, len(sequences), (args.train_batch_size,), generator=generator)
        batch = sequences[indices]
        if args.factorized:
            logits = factorized_logits(lm, label_ids[indices], batch, boi_token_id, processor.layout)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 2), batch.flatten())
        else:
            targets = batch.clone()
            targets[:, :2] = -100  # the label and begin-of-image are given, never predicted
            loss = lm(input_ids=batch, labels=targets).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        log.append({"step": step, "loss": loss.item()})
        if step % args.logging_steps == 0 or step == args.max_train_steps - 1:
            print(f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - started:.1f}s)")
    lm.eval()
    train_seconds = time.perf_counter() - train_started

    sample_started = time.perf_counter()
    sample_labels = [index % num_classes for index in range(args.num_samples)]
    sampler = sample_factorized if args.factorized else sample_sequences
    samples = sampler(lm, processor, sample_labels, grid_size, boi_token_id, args.temperature, args.top_k, args.seed)
    decoded = processor.batch_decode(samples, grid_size)
    sample_seconds = time.perf_counter() - sample_started
    columns = math.ceil(args.num_samples / num_classes) if args.num_samples >= num_classes else args.num_samples
    # One row per label: reorder so that row r holds the samples of label r.
    order = sorted(range(len(sample_labels)), key=lambda index: (sample_labels[index], index))
    image_grid([decoded[index] for index in order], columns).save(os.path.join(args.output_dir, "samples.png"))

    lm.save_pretrained(args.output_dir)
    tokenizer_dir = os.path.join(args.output_dir, "image_tokenizer")
    tokenizer.save_pretrained(tokenizer_dir)
    processor.save_pretrained(tokenizer_dir)
    with open(os.path.join(args.output_dir, "samples.json"), "w") as handle:
        json.dump({"labels": sample_labels, "order": order, "columns": columns, "grid_size": list(grid_size),
                   "sequences": samples.tolist()}, handle)
    with open(os.path.join(args.output_dir, "train_log.json"), "w") as handle:
        json.dump({"args": vars(args), "num_train_sequences": len(sequences), "sequence_length": sequence_length,
                   "lm_parameters": lm.num_parameters(), "log": log,
                   "train_seconds": train_seconds, "sample_seconds": sample_seconds,
                   "seconds": time.perf_counter() - started}, handle, indent=1)
    print(f"saved the LM to {args.output_dir}, samples to {os.path.join(args.output_dir, 'samples.png')} "
          f"({time.perf_counter() - started:.1f}s)")


if __name__ == "__main__":
    main()
