"""The autoencoder core's edges (optvq_hf.autoencoder, behind OptVQModel and OptVQVQModel) that the modeling tests do
not reach: the latents' checks on grids whose side differs from embed_dim, the error that names bad pixels, the
quantizer in float32 under another default dtype, the copy between front ends naming at most five keys (each written
against a mutant that survived; see docs/testing.md)."""

import pytest
import torch

from optvq_hf import OptVQConfig, OptVQModel, OptVQVQModel

TINY = dict(base_channels=32, channel_multipliers=[1, 2], num_res_blocks=1, attn_resolutions=[8], resolution=16,
            latent_channels=16, embed_dim=8, codebook_size=32, num_heads=2)


def tiny_model(**overrides):
    torch.manual_seed(0)
    return OptVQModel(OptVQConfig(**{**TINY, **overrides})).eval()


def test_latents_are_checked_by_their_channels_not_their_grid():
    """embed_dim is 8: a 4 x 4 or 5 x 7 grid of 8 channels decodes and quantizes; 3 channels on an 8 x 8 grid (a
    side equal to embed_dim) are refused with the shape named, and so is a list, by its type."""
    model = tiny_model()
    for height, width in ((4, 4), (5, 7)):
        latents = torch.randn(1, 8, height, width)
        assert model.decode(latents).shape == (1, 3, 2 * height, 2 * width)
        assert model.quantize(latents).token_ids.shape == (1, 2, height, width)
    with pytest.raises(ValueError, match=r"`quantized` must have shape \(B, 8, h, w\) \(embed_dim=8\), got \(1, 3, 8, "
                                         r"8\)"):
        model.decode(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"`latents` must have shape .* got list"):
        model.quantize([[0.0] * 8])


def test_decoding_accepts_latents_beyond_the_quantizers_bound():
    """Only latents that are quantized are bounded (MAX_FEATURE_MAGNITUDE = 1e15, the quantizer's float32 loss);
    decoding takes any finite latents (its first layer normalizes them)."""
    model = tiny_model()
    latents = torch.randn(1, 8, 4, 4) * 1e17
    with pytest.raises(ValueError, match="magnitude"):
        model.quantize(latents)
    pixels = model.decode(latents)
    assert torch.isfinite(pixels).all()


def test_nan_pixels_are_named_as_pixels():
    """Encoding NaN pixels: the error is the pixels' own finiteness error, not one about the latents."""
    model = tiny_model()
    pixel_values = torch.zeros(1, 3, 16, 16)
    pixel_values[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^`pixel_values` contain NaN or Inf values"):
        model.encode(pixel_values)


@pytest.mark.parametrize("front_end", [OptVQModel, OptVQVQModel])
def test_the_quantizer_is_built_in_float32_under_another_default_dtype(front_end):
    """Building under a bf16 default dtype (as `from_config(config, dtype=torch.bfloat16)` does): the network is
    bf16, the quantizer's parameters float32, with the values a float32 build draws."""
    config = OptVQConfig(**TINY)

    def build():
        torch.manual_seed(0)
        if front_end is OptVQModel:
            return OptVQModel(config)
        return OptVQVQModel.from_config({k: v for k, v in config.to_dict().items() if k in OptVQConfig().to_dict()})

    reference = build().quantizer
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = build()
    finally:
        torch.set_default_dtype(previous)
    quantizer = model.quantizer
    assert next(model.decoder.parameters()).dtype == torch.bfloat16
    for name, parameter in quantizer.named_parameters():
        assert parameter.dtype == torch.float32, name
    if front_end is OptVQModel:  # post_init draws the quantizer again, in float32
        assert torch.equal(quantizer.codebook, reference.codebook)
    else:  # drawn in bf16 while building, then cast: the float32 draws rounded to bf16 (relative error <= 2^-9)
        for (name, parameter), expected in zip(quantizer.named_parameters(), reference.parameters()):
            torch.testing.assert_close(parameter, expected, rtol=2 ** -8, atol=0, msg=name)


def test_copying_weights_between_architectures_names_the_first_five_keys_of_each_side():
    small_cnn = tiny_model(architecture="simple_cnn", channel_multipliers=[1, 2, 2])
    vqgan = tiny_model()
    missing = sorted(set(vqgan.state_dict()) - set(small_cnn.state_dict()))
    unexpected = sorted(set(small_cnn.state_dict()) - set(vqgan.state_dict()))
    assert len(missing) > 6 and len(unexpected) > 6
    with pytest.raises(ValueError) as error:
        vqgan._copy_weights_from(small_cnn)
    assert str(error.value) == f"State dicts differ: missing {missing[:5]}, unexpected {unexpected[:5]}."


def test_a_side_not_divisible_by_the_downsampling_factor_is_refused_alone():
    model = tiny_model()
    for height, width in ((16, 15), (15, 16)):
        with pytest.raises(ValueError, match=f"divisible by the downsampling factor 2, got {height}x{width}"):
            model.encode(torch.zeros(1, 3, height, width))


def test_token_ids_of_another_type_are_named_by_their_type():
    model = tiny_model()
    with pytest.raises(ValueError, match="Token ids must be a torch.Tensor, got list"):
        model.decode_tokens([[[[0]]]])
    with pytest.raises(ValueError, match="Token ids must be an integer tensor, got dtype torch.float32"):
        model.decode_tokens(torch.zeros(1, 5, 5))  # a shape no layout accepts: the dtype is named first


def test_converted_weights_are_a_copy_in_the_sources_dtypes():
    """`OptVQVQModel.from_optvq` (lossless, "dtypes and devices kept"): the converted model holds its own copy, in the
    source's dtypes (here a bf16 decoder); training one front end afterwards leaves the other alone."""
    model = tiny_model()
    model.decoder.to(torch.bfloat16)
    converted = OptVQVQModel.from_optvq(model)
    assert next(converted.decoder.parameters()).dtype == torch.bfloat16
    assert converted.quantizer.embedding.weight.dtype == torch.float32
    before = {k: v.clone() for k, v in converted.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in converted.state_dict().items())
