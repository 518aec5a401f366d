"""OptVQImageProcessor on real photos bundled with scikit-image."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from transformers import AutoImageProcessor

from optvq_hf import OptVQConfig, OptVQImageProcessor


@pytest.fixture(scope="module")
def astronaut():
    return Image.fromarray(skdata.astronaut())  # 512x512 RGB


def test_resize_crop_and_range_match_an_independent_pipeline(astronaut):
    processor = OptVQImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 48, "width": 48})
    pixel_values = processor(astronaut, return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 48, 48)
    resized = np.asarray(astronaut.resize((64, 64), Image.BICUBIC), dtype=np.float64)
    expected = resized[8:56, 8:56] / 255.0 * 2 - 1
    np.testing.assert_allclose(pixel_values[0].permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert pixel_values.min() >= -1 and pixel_values.max() <= 1


def test_non_square_and_batch(astronaut):
    wide = astronaut.crop((0, 0, 512, 256))
    processor = OptVQImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    out = processor([wide, astronaut, np.asarray(astronaut)], return_tensors="pt").pixel_values
    assert out.shape == (3, 3, 32, 32)
    torch.testing.assert_close(out[1], out[2])


def test_grayscale_models_get_one_channel(astronaut):
    camera = Image.fromarray(skdata.camera())  # grayscale photo
    processor = OptVQImageProcessor(num_channels=1, size={"height": 32, "width": 32}, do_center_crop=False)
    gray = processor(camera, return_tensors="pt").pixel_values
    assert gray.shape == (1, 1, 32, 32)
    expected = np.asarray(camera.resize((32, 32), Image.BICUBIC), dtype=np.float64) / 127.5 - 1
    np.testing.assert_allclose(gray[0, 0].numpy(), expected, atol=1e-6)
    # an RGB photo is converted to luma (PIL's "L")
    rgb = processor(astronaut, return_tensors="pt").pixel_values
    expected_rgb = np.asarray(astronaut.resize((32, 32), Image.BICUBIC).convert("L"), dtype=np.float64) / 127.5 - 1
    np.testing.assert_allclose(rgb[0, 0].numpy(), expected_rgb, atol=2 / 127.5)


def test_postprocess_round_trip(astronaut):
    processor = OptVQImageProcessor(size={"height": 64, "width": 64}, do_center_crop=False)
    pixel_values = processor(astronaut, return_tensors="pt").pixel_values
    images = processor.postprocess(pixel_values, output_type="pil")
    assert isinstance(images[0], Image.Image) and images[0].size == (64, 64)
    np.testing.assert_array_equal(np.asarray(images[0]), np.asarray(astronaut.resize((64, 64), Image.BICUBIC)))
    arrays = processor.postprocess(pixel_values, output_type="np")
    assert arrays.dtype == np.uint8 and arrays.shape == (1, 64, 64, 3)
    unit = processor.postprocess(torch.tensor([[[[3.0]]]]), output_type="pt")
    assert unit.item() == 1.0
    with pytest.raises(ValueError, match="output_type"):
        processor.postprocess(pixel_values, output_type="jpeg")
    with pytest.raises(ValueError, match="num_channels"):
        OptVQImageProcessor(num_channels=2)


def test_from_model_config_and_auto_loading(tmp_path):
    config = OptVQConfig.from_preset("optvq-mnist")
    processor = OptVQImageProcessor.from_model_config(config)
    assert processor.num_channels == 1 and processor.crop_size["height"] == 32
    processor.save_pretrained(tmp_path)
    config.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, OptVQImageProcessor) and loaded.num_channels == 1
    digit = Image.fromarray((np.arange(28 * 28).reshape(28, 28) % 256).astype(np.uint8))
    assert loaded(digit, return_tensors="pt").pixel_values.shape == (1, 1, 32, 32)
