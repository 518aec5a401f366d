"""OptVQProcessor: images -> LM sequences -> images, save/load, and datasets.map."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from optvq_hf import ImageSequenceLayout, OptVQConfig, OptVQImageProcessor, OptVQModel, OptVQProcessor


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = OptVQConfig.from_preset("optvq-mnist", codebook_size=64, base_channels=8, latent_channels=8,
                                     resolution=16)
    return OptVQModel(config).eval()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8), mode="L") for _ in range(5)]


def _reference_ids(model, images, offset, **layout_kwargs):
    """The same pipeline spelled out with the underlying pieces."""
    pixel_values = OptVQImageProcessor.from_model_config(model.config)(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        token_ids = model.encode(pixel_values).token_ids
    return token_ids, model.tokens_to_sequence(token_ids, offset=offset, **layout_kwargs)


def test_call_matches_model_pipeline(tiny_model, images):
    processor = OptVQProcessor.from_model(tiny_model, offset=10, boi_token_id=0, eoi_token_id=1, encode_batch_size=2)
    batch = processor(images=images, return_tensors="pt")
    token_ids, expected = _reference_ids(tiny_model, images, 10, boi_token_id=0, eoi_token_id=1)
    assert torch.equal(batch["input_ids"], expected)
    assert batch["input_ids"].shape == (5, 1 + 4 * 4 * 4 + 1)
    assert torch.equal(batch["attention_mask"], torch.ones(5, 66, dtype=torch.long))
    assert batch["image_grid_size"].tolist() == [[4, 4]] * 5
    assert processor.vocab_size == 10 + 64
    # Back to token grids and images, using only what the processor returned.
    assert torch.equal(processor.sequence_to_tokens(batch["input_ids"], batch["image_grid_size"]), token_ids)
    decoded = processor.batch_decode(batch["input_ids"], batch["image_grid_size"], output_type="np")
    with torch.no_grad():
        reference = processor.image_processor.postprocess(tiny_model.decode_tokens(token_ids), output_type="np")
    np.testing.assert_array_equal(decoded, reference)
    single = processor.decode(batch["input_ids"][0], (4, 4))
    assert isinstance(single, Image.Image) and single.size == (16, 16)
    np.testing.assert_array_equal(np.asarray(single), reference[0, ..., 0])


def test_return_types_and_pixel_values(tiny_model, images):
    processor = OptVQProcessor.from_model(tiny_model)
    as_lists = processor(images=images[:2])
    assert isinstance(as_lists["input_ids"], list) and isinstance(as_lists["input_ids"][0][0], int)
    as_np = processor(images=images[:2], return_tensors="np", return_pixel_values=True)
    assert as_np["input_ids"].dtype == np.int64 and as_np["pixel_values"].shape == (2, 1, 16, 16)
    assert as_np["input_ids"].tolist() == as_lists["input_ids"]
    # Ready pixel values give the same ids as the images they came from.
    from_pixels = processor(pixel_values=torch.as_tensor(as_np["pixel_values"]), return_tensors="np")
    np.testing.assert_array_equal(from_pixels["input_ids"], as_np["input_ids"])


def test_factorized_and_per_head(tiny_model, images):
    processor = OptVQProcessor.from_model(tiny_model, offset=3, head_vocabulary="per_head", factorized=True)
    batch = processor(images=images[:3], return_tensors="pt")
    token_ids, _ = _reference_ids(tiny_model, images[:3], 0)
    assert batch["input_ids"].shape == (3, 16, 4)
    assert batch["attention_mask"].shape == (3, 16)
    # row p holds heads 0..3 of position p; head k lives in [3 + 64k, 3 + 64(k+1)).
    expected = token_ids.permute(0, 2, 3, 1).reshape(3, 16, 4) + 3 + torch.arange(4) * 64
    assert torch.equal(batch["input_ids"], expected)
    assert processor.vocab_size == 3 + 4 * 64
    assert len(processor.batch_decode(batch["input_ids"], (4, 4))) == 3


def test_save_and_load_round_trip(tiny_model, images, tmp_path):
    processor = OptVQProcessor.from_model(tiny_model, offset=12, boi_token_id=10, eoi_token_id=11)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["offset"] == 12 and saved["boi_token_id"] == 10 and saved["codebook_size"] == 64
    assert saved["num_heads"] == 4 and "model" not in saved and "_model" not in saved
    assert saved["image_processor"]["num_channels"] == 1
    # Without the model in the folder: layout and image processor only.
    bare = OptVQProcessor.from_pretrained(tmp_path)
    assert bare.model is None and bare.layout == processor.layout
    with pytest.raises(ValueError, match="needs an OptVQModel"):
        bare(images=images[:1])
    # With the model saved in the same folder it is loaded too and gives the same sequences.
    tiny_model.save_pretrained(tmp_path)
    loaded = OptVQProcessor.from_pretrained(tmp_path)
    assert loaded.model is not None
    from transformers import AutoProcessor

    auto = AutoProcessor.from_pretrained(tmp_path)  # registered for OptVQConfig
    assert isinstance(auto, OptVQProcessor) and auto.layout == processor.layout and auto.model is not None
    np.testing.assert_array_equal(loaded(images=images, return_tensors="np")["input_ids"],
                                  processor(images=images, return_tensors="np")["input_ids"])
    assert os.path.isfile(tmp_path / "model.safetensors")


def test_datasets_map(tiny_model, images):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 3, 4]},
                                         features=datasets.Features({"image": datasets.Image(),
                                                                     "label": datasets.Value("int64")}))
    processor = OptVQProcessor.from_model(tiny_model, offset=10, boi_token_id=0)
    tokenized = dataset.map(processor.map_fn("image"), batched=True, batch_size=2, remove_columns=["image"])
    assert set(tokenized.column_names) == {"label", "input_ids", "attention_mask", "image_grid_size"}
    direct = processor(images=images, return_tensors="pt")
    with_format = tokenized.with_format("torch")[:]  # a dict of batched tensors
    assert torch.equal(with_format["input_ids"], direct["input_ids"])
    assert with_format["label"].tolist() == [0, 1, 2, 3, 4]
    decoded = processor.batch_decode(with_format["input_ids"], with_format["image_grid_size"], output_type="pt")
    assert decoded.shape == (5, 1, 16, 16) and torch.isfinite(decoded).all()
    with pytest.raises(ValueError, match="Column 'pixels' not found"):
        dataset.map(processor.map_fn("pixels"), batched=True)


def test_errors(tiny_model, images):
    with pytest.raises(ValueError, match="codebook_size"):
        OptVQProcessor(OptVQImageProcessor())
    with pytest.raises(ValueError, match="disagrees"):
        OptVQProcessor.from_model(tiny_model, codebook_size=32)
    processor = OptVQProcessor(OptVQImageProcessor(num_channels=1), codebook_size=32, num_heads=4)
    with pytest.raises(ValueError, match="does not match"):
        processor.model = tiny_model
    processor = OptVQProcessor.from_model(tiny_model, offset=10)
    with pytest.raises(ValueError, match="return_tensors"):
        processor(images=images[:1], return_tensors="tf")
    with pytest.raises(ValueError, match="Pass `images`"):
        processor()
    sequence = processor(images=images[:2], return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match=r"shape \(B, 64\)"):
        processor.batch_decode(sequence[:, 1:], (4, 4))
    with pytest.raises(ValueError, match=r"must lie in \[10, 74\)"):
        processor.batch_decode(torch.full_like(sequence, 9), (4, 4))  # one below the offset
    assert isinstance(processor.layout, ImageSequenceLayout)


def test_docs_page_snippets_run():
    """The ```python blocks of docs/lm_tokenizer.md run as written, in order, in one namespace."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "docs", "lm_tokenizer.md"), encoding="utf-8").read()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert len(blocks) >= 5
    namespace = {}
    for block in blocks:
        exec(compile(block, "docs/lm_tokenizer.md", "exec"), namespace)
    assert namespace["layout"].vocab_size == 33024
    assert namespace["tokenized"].column_names == ["label", "input_ids", "attention_mask", "image_grid_size"]
