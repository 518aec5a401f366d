"""The Table 4 CNN's initialization: the untrained autoencoder passes its input through (docs/model.md).

The root of `make demo`'s dead seeds (docs/benchmarks.md, "The demo across seeds"): with PyTorch's default
initialization the untrained small-CNN autoencoder reconstructed every image alike (spread across images ~1e-5 of the
images'), and training had to escape that constant function first; at the demo's learning rate the decoder's ReLUs
died during the escape for 3 of 10 seeds.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from optvq_hf import OptVQConfig, OptVQModel, OptVQVQModel
from optvq_hf.diffusers_vq import OPTVQ_CONFIG_FIELDS
from optvq_hf.training import reconstruction_spread


def _structured_images(count=32):
    smooth = torch.from_numpy(np.random.default_rng(0).standard_normal((count, 3, 8, 8))).float()
    return torch.nn.functional.interpolate(smooth, size=32, mode="bilinear").tanh()  # smooth images in [-1, 1]


def _expected_std(conv, gain):
    fan_in = conv.in_channels * math.prod(conv.kernel_size)
    if isinstance(conv, nn.ConvTranspose2d):
        fan_in //= math.prod(conv.stride)  # each output pixel sees one tap per input channel (kernel 2, stride 2)
    return gain / fan_in**0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_untrained_small_cnn_reconstructs_images_differently(seed):
    pixels = _structured_images()
    torch.manual_seed(seed)
    model = OptVQModel(OptVQConfig.from_preset("optvq-cifar10", codebook_size=256)).eval()
    with torch.no_grad():
        # PyTorch's default initialization gave ~4e-5 here.
        assert reconstruction_spread(pixels, model(pixels).reconstruction) > 0.05


def test_small_cnn_weights_follow_the_documented_law_in_both_front_ends():
    """N(0, gain^2 / fan_in) with gain sqrt(2) after a ReLU and 1 otherwise, zero biases; OptVQModel (through
    transformers' `post_init`) and the diffusers OptVQVQModel build the same backbone the same way."""
    config = OptVQConfig.from_preset("optvq-cifar10")
    torch.manual_seed(0)
    transformers_model = OptVQModel(config)
    diffusers_model = OptVQVQModel(**{name: getattr(config, name) for name in OPTVQ_CONFIG_FIELDS})
    for model in (transformers_model, diffusers_model):
        for conv, gain in ((model.encoder.in_fc, 1.0), (model.encoder.down1, 2**0.5), (model.encoder.conv2, 1.0),
                           (model.encoder.out_fc, 2**0.5), (model.decoder.in_fc, 1.0), (model.decoder.up1, 2**0.5),
                           (model.decoder.up2, 2**0.5), (model.decoder.out_fc, 2**0.5)):
            assert float(conv.weight.detach().std()) == pytest.approx(_expected_std(conv, gain), rel=0.15)
            assert float(conv.bias.detach().abs().max()) == 0.0
    # The VQGAN backbone (GroupNorm keeps its signal) keeps PyTorch's default, as the original code.
    vqgan = OptVQModel(OptVQConfig.from_preset("optvq-imagenet-16x16x4", base_channels=32, channel_multipliers=[1, 2],
                                               attn_resolutions=[], resolution=32, codebook_size=64))
    assert float(vqgan.encoder.conv_in.bias.detach().abs().max()) > 0.0
