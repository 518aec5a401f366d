"""examples/train_ar_prior.py at tiny size: real OptVQ tokenizer, real Llama prior, real generate and decoding."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from optvq_hf import OptVQConfig, OptVQModel, OptVQProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_ar_prior.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("train_ar_prior", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args, cwd):
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=120)


def _check_samples_png(output_dir):
    """Every tile of samples.png must be the tokenizer's decoding of the saved sequence, at its label's row."""
    info = json.loads(open(os.path.join(output_dir, "samples.json")).read())
    processor = OptVQProcessor.from_pretrained(os.path.join(output_dir, "image_tokenizer"))
    sequences = torch.tensor(info["sequences"])
    decoded = processor.batch_decode(sequences, info["grid_size"], output_type="np")[..., 0]
    grid = np.asarray(Image.open(os.path.join(output_dir, "samples.png")))
    height, width = decoded.shape[1:]
    for slot, index in enumerate(info["order"]):
        row, column = divmod(slot, info["columns"])
        top, left = 2 + row * (height + 2), 2 + column * (width + 2)
        np.testing.assert_array_equal(grid[top:top + height, left:left + width], decoded[index])
    labels_in_order = [info["labels"][index] for index in info["order"]]
    assert labels_in_order == sorted(labels_in_order)
    return info, processor


def test_prior_with_saved_multi_head_tokenizer(tmp_path):
    torch.manual_seed(0)
    config = OptVQConfig.from_preset("optvq-mnist", codebook_size=32, num_heads=2, embed_dim=8, base_channels=8,
                                     latent_channels=8, resolution=16)
    tokenizer_dir = tmp_path / "tokenizer"
    OptVQModel(config).save_pretrained(tokenizer_dir)
    output_dir = tmp_path / "prior"
    _load_script().main(["--tokenizer", str(tokenizer_dir), "--dataset_name", "synthetic-digits",
                         "--max_train_samples", "60", "--output_dir", str(output_dir), "--max_train_steps", "40",
                         "--train_batch_size", "16", "--warmup_steps", "5", "--hidden_size", "32", "--num_layers", "1",
                         "--num_attention_heads", "2", "--num_samples", "4", "--head_vocabulary", "per_head",
                         "--learning_rate", "3e-3"])

    info, processor = _check_samples_png(output_dir)
    assert info["labels"] == [0, 1, 2, 3] and info["grid_size"] == [4, 4]
    # Sequences: begin-of-image (= 10 classes) then 4 * 4 positions x 2 heads, head k in its own id range.
    sequences = torch.tensor(info["sequences"])
    assert sequences.shape == (4, 1 + 32)
    assert sequences[:, 0].eq(10).all()
    offset = 11
    assert processor.layout.offset == offset and processor.layout.head_vocabulary == "per_head"
    assert ((sequences[:, 1::2] >= offset) & (sequences[:, 1::2] < offset + 32)).all()
    assert ((sequences[:, 2::2] >= offset + 32) & (sequences[:, 2::2] < offset + 64)).all()

    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM.from_pretrained(output_dir)
    assert lm.config.vocab_size == offset + 2 * 32 == processor.vocab_size
    assert lm.config.optvq_offset == offset and lm.config.optvq_grid_size == [4, 4]
    assert lm.config.num_hidden_layers == 1

    log = json.loads((output_dir / "train_log.json").read_text())
    losses = [entry["loss"] for entry in log["log"]]
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses


def test_prior_with_quick_tokenizer_and_label_rows(tmp_path):
    # In process, as the other runs (the command line itself is checked by `test_command_line`).
    _load_script().main(["--train_tokenizer_steps", "3", "--tokenizer_codebook_size", "16", "--resolution", "16",
                         "--dataset_name", "synthetic-digits", "--max_train_samples", "30", "--output_dir",
                         str(tmp_path / "out"), "--max_train_steps", "3", "--train_batch_size", "8", "--hidden_size",
                         "32", "--num_layers", "1", "--num_attention_heads", "2", "--num_samples", "12"])
    info, processor = _check_samples_png(tmp_path / "out")
    # 12 samples over 10 labels: two columns, rows ordered by label.
    assert info["columns"] == 2 and info["labels"] == [i % 10 for i in range(12)]
    assert processor.model.config.codebook_size == 16
    assert Image.open(tmp_path / "out" / "samples.png").size == (2 + 2 * 18, 2 + 6 * 18)


def test_image_token_logits_processor_restricts_each_head():
    script = _load_script()
    layout = OptVQProcessor(script.OptVQImageProcessor(num_channels=1), codebook_size=5, num_heads=2, offset=3,
                            boi_token_id=2, head_vocabulary="per_head").layout
    logits_processor = script.ImageTokenLogitsProcessor(layout, prompt_length=2)
    scores = torch.randn(3, layout.vocab_size)
    for generated, (low, high) in ((0, (3, 8)), (1, (8, 13)), (2, (3, 8))):
        masked = logits_processor(torch.zeros(3, 2 + generated, dtype=torch.long), scores)
        finite = torch.isfinite(masked)
        assert finite[:, low:high].all() and finite.sum() == 3 * (high - low)
        assert torch.equal(masked[:, low:high], scores[:, low:high])


def test_synthetic_digits_and_argument_errors(tmp_path):
    script = _load_script()
    images, labels = script.synthetic_digits(12, seed=1)
    assert labels == [i % 10 for i in range(12)]
    arrays = np.stack([np.asarray(image) for image in images])
    assert arrays.shape == (12, 28, 28) and arrays.max() > 200 and arrays.mean() < 100
    assert not np.array_equal(arrays[0], arrays[10])  # same digit, different draw
    with pytest.raises(SystemExit):
        script.parse_args(["--output_dir", str(tmp_path)])  # neither --tokenizer nor --train_tokenizer_steps
    args = script.parse_args(["--output_dir", str(tmp_path), "--tokenizer", "x", "--dataset_name", "mnist",
                              "--data_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="MNIST parquet not found"):
        script.load_labelled_images(args)


def test_factorized_prior_run(tmp_path):
    torch.manual_seed(0)
    config = OptVQConfig.from_preset("optvq-mnist", codebook_size=16, num_heads=2, embed_dim=8, base_channels=8,
                                     latent_channels=8, resolution=16)
    OptVQModel(config).save_pretrained(tmp_path / "tokenizer")
    script = _load_script()
    script.main(["--tokenizer", str(tmp_path / "tokenizer"), "--factorized", "--dataset_name", "synthetic-digits",
                 "--max_train_samples", "20", "--output_dir", str(tmp_path / "out"), "--max_train_steps", "3",
                 "--train_batch_size", "4", "--hidden_size", "32", "--num_layers", "1", "--num_attention_heads", "2",
                 "--num_samples", "3"])
    info, processor = _check_samples_png(tmp_path / "out")
    rows = torch.tensor(info["sequences"])
    assert rows.shape == (3, 16, 2) and processor.layout.factorized
    assert ((rows[..., 0] >= 11) & (rows[..., 0] < 27)).all() and ((rows[..., 1] >= 27) & (rows[..., 1] < 43)).all()
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert lm.config.optvq_factorized is True and lm.config.max_position_embeddings == 17
    with pytest.raises(SystemExit):
        script.parse_args(["--tokenizer", "t", "--factorized", "--head_vocabulary", "shared", "--output_dir", "x"])


def test_factorized_logits_are_causal_over_cells_and_heads():
    from transformers import LlamaConfig, LlamaForCausalLM

    script = _load_script()
    torch.manual_seed(0)
    layout = OptVQProcessor(script.OptVQImageProcessor(num_channels=1), codebook_size=6, num_heads=3, offset=3,
                            head_vocabulary="per_head", factorized=True).layout
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=layout.vocab_size, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=8, tie_word_embeddings=True)).eval()
    rows = layout.tokens_to_sequence(torch.randint(0, 6, (2, 3, 2, 2)))  # (2, 4 cells, 3 heads)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        logits = script.factorized_logits(lm, labels, rows, 2, layout)
        changed = rows.clone()
        changed[:, 2, 1] = 9 + (changed[:, 2, 1] - 9 + 1) % 6  # another head-1 id (range [9, 15))
        assert not torch.equal(changed, rows)
        other = script.factorized_logits(lm, labels, changed, 2, layout)
    assert logits.shape == (2, 4, 3, layout.vocab_size)
    # Outside head k's range every logit is -inf.
    assert torch.isinf(logits[:, :, 0, 9:]).all() and torch.isfinite(logits[:, :, 0, 3:9]).all()
    # Changing head 1 of cell 2 leaves earlier cells and heads 0-1 of cell 2 unchanged, and changes what follows.
    torch.testing.assert_close(other[:, :2], logits[:, :2])
    torch.testing.assert_close(other[:, 2, :2], logits[:, 2, :2])
    assert not torch.allclose(other[:, 2, 2], logits[:, 2, 2])
    assert not torch.allclose(other[:, 3], logits[:, 3])


def test_command_line(tmp_path):
    """The script runs as a program (tiny sizes, 2 steps)."""
    torch.manual_seed(0)
    config = OptVQConfig.from_preset("optvq-mnist", codebook_size=16, num_heads=1, base_channels=8, latent_channels=8,
                                     resolution=16)
    OptVQModel(config).save_pretrained(tmp_path / "tokenizer")
    result = _run("--tokenizer", "tokenizer", "--dataset_name", "synthetic-digits", "--max_train_samples", "10",
                  "--output_dir", "out", "--max_train_steps", "2", "--train_batch_size", "4", "--hidden_size", "16",
                  "--num_layers", "1", "--num_attention_heads", "2", "--num_samples", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "saved the LM to out" in result.stdout
    assert {"config.json", "model.safetensors", "samples.png", "samples.json", "train_log.json",
            "image_tokenizer"} <= set(os.listdir(tmp_path / "out"))


def test_prior_on_a_tokenized_dataset_trains_on_the_same_sequences(tmp_path):
    """tokenize_dataset.py -> train_ar_prior.py --token_dataset: the same training run (losses equal) as the prior
    tokenizing the same images itself, and the samples decode with the tokenizer the card names."""
    import datasets

    import training_helpers  # noqa: F401  (puts examples/ on sys.path)
    import tokenize_dataset

    script = _load_script()
    images, labels = script.synthetic_digits(24, seed=2, size=16)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    os.makedirs(tmp_path / "digits")
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
        str(tmp_path / "digits" / "train-00000-of-00001.parquet"))
    torch.manual_seed(0)
    config = OptVQConfig.from_preset("optvq-mnist", codebook_size=16, num_heads=2, embed_dim=8, base_channels=8,
                                     latent_channels=8, resolution=16)
    OptVQModel(config).save_pretrained(tmp_path / "tokenizer")
    tokenize_dataset.main(["--model_name_or_path", str(tmp_path / "tokenizer"), "--dataset_name",
                           str(tmp_path / "digits"), "--keep_columns", "label", "--output_dir", str(tmp_path / "tokens"),
                           "--shard_size", "10", "--disable_progress_bar"])
    common = ["--max_train_samples", "20", "--max_train_steps", "4", "--train_batch_size", "4", "--hidden_size", "32",
              "--num_layers", "1", "--num_attention_heads", "2", "--num_samples", "3", "--factorized"]
    script.main(["--token_dataset", str(tmp_path / "tokens"), "--output_dir", str(tmp_path / "from_tokens"), *common])
    script.main(["--tokenizer", str(tmp_path / "tokenizer"), "--dataset_name", str(tmp_path / "digits"),
                 "--output_dir", str(tmp_path / "from_images"), *common])
    logs = [json.loads((tmp_path / name / "train_log.json").read_text()) for name in ("from_tokens", "from_images")]
    assert logs[0]["num_train_sequences"] == logs[1]["num_train_sequences"] == 20
    np.testing.assert_allclose([e["loss"] for e in logs[0]["log"]], [e["loss"] for e in logs[1]["log"]], rtol=1e-6)
    info, processor = _check_samples_png(tmp_path / "from_tokens")
    assert info["grid_size"] == [4, 4] and processor.model.config.codebook_size == 16
    with pytest.raises(SystemExit):
        script.parse_args(["--token_dataset", "t", "--train_tokenizer_steps", "3", "--output_dir", "x"])


def test_factorized_sampling_passes_the_kv_cache_under_this_transformers_name():
    """`past_key_values=` is deprecated in newer transformers (removed in 5.40): the sampler uses the name the
    installed version's forward takes, so it raises no deprecation warning."""
    import inspect
    import warnings

    from transformers import LlamaConfig, LlamaForCausalLM

    script = _load_script()
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)).eval()
    name = script.cache_keyword(lm.model)
    assert name in inspect.signature(lm.model.forward).parameters
    processor = OptVQProcessor(script.OptVQImageProcessor(num_channels=1), codebook_size=4, num_heads=2, offset=3,
                               head_vocabulary="per_head", factorized=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = script.sample_factorized(lm, processor, [0, 1], (2, 2), boi_token_id=2)
    assert rows.shape == (2, 4, 2)
