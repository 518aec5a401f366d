"""OptVQ model configuration."""

from __future__ import annotations

import copy
import inspect
from typing import Any

from transformers import PretrainedConfig
from transformers.utils import logging

from .codebook_losses import QUANTIZATION_LOSSES
from .quantization import available_quantizer_types, get_quantizer_class

logger = logging.get_logger(__name__)

ARCHITECTURES = ("vqgan", "simple_cnn")
INFERENCE_ASSIGNMENTS = ("nearest", "sinkhorn")
NORMALIZATIONS = ("all", "dim", "none")

_IMAGENET_F16 = dict(
    architecture="vqgan",
    in_channels=3,
    out_channels=3,
    base_channels=128,
    channel_multipliers=[1, 1, 2, 2, 4],
    num_res_blocks=2,
    attn_resolutions=[16],
    resolution=256,
    latent_channels=256,
    embed_dim=256,
    codebook_size=16384,
    quantizer_type="optvq",
)

_SMALL_CNN = dict(
    architecture="simple_cnn",
    in_channels=1,
    out_channels=1,
    base_channels=16,
    channel_multipliers=[1, 1, 2],
    num_res_blocks=0,
    attn_resolutions=[],
    resolution=32,
    latent_channels=32,
    embed_dim=8,
    codebook_size=1024,
)

# Each preset reproduces an original config field for field (docs/quantizer.md, "Presets"). The original's plain-VQ
# configs leave `loss_q_type` at its class default, "ce"; its OptVQ configs set "l2".
PRESETS: dict[str, dict[str, Any]] = {
    # The two published ImageNet checkpoints (BorelTHU/optvq-16x16x4 and -16x16x8).
    "optvq-imagenet-16x16x4": dict(_IMAGENET_F16, num_heads=4),
    "optvq-imagenet-16x16x8": dict(_IMAGENET_F16, num_heads=8),
    # The third published ImageNet config: downsampling factor 32, 8x8 latents.
    "optvq-imagenet-f32": dict(
        _IMAGENET_F16, channel_multipliers=[1, 1, 2, 2, 4, 4], attn_resolutions=[8], num_heads=8
    ),
    # The plain-VQ ImageNet baseline of the original release.
    "vq-imagenet-16x16x4": dict(_IMAGENET_F16, num_heads=4, quantizer_type="vq", quantization_loss="ce"),
    # The paper's Table 4 CNN (f = 4) for MNIST and CIFAR-10 at 32x32.
    "optvq-mnist": dict(_SMALL_CNN, num_heads=4, quantizer_type="optvq"),
    "vq-mnist": dict(_SMALL_CNN, num_heads=1, quantizer_type="vq", quantization_loss="ce"),
    "optvq-cifar10": dict(_SMALL_CNN, in_channels=3, out_channels=3, num_heads=4, quantizer_type="optvq"),
    "vq-cifar10": dict(_SMALL_CNN, in_channels=3, out_channels=3, num_heads=1, quantizer_type="vq",
                       quantization_loss="ce"),
    # OT-VAE (equipartition OT targets + Gumbel-softmax decoding) on the same network, for ablations.
    "otvae-mnist": dict(_SMALL_CNN, num_heads=4, quantizer_type="otvae"),
    "otvae-cifar10": dict(_SMALL_CNN, in_channels=3, out_channels=3, num_heads=4, quantizer_type="otvae"),
}


class OptVQConfig(PretrainedConfig):
    r"""
    Configuration of an [`OptVQModel`]: an image autoencoder whose latents are quantized by OptVQ (optimal-transport
    assignment solved by Sinkhorn iterations) or by plain nearest-neighbour VQ.

    Two backbones are available: the VQGAN (taming-transformers) encoder/decoder of the paper's ImageNet models, and
    the small CNN of the paper's Table 4 (MNIST / CIFAR-10). [`OptVQConfig.from_preset`] builds the paper's settings.

    Args:
        architecture (`str`, *optional*, defaults to `"vqgan"`):
            `"vqgan"` (ResNet blocks, self-attention, GroupNorm) or `"simple_cnn"` (the paper's Table 4 CNN, f = 4).
        in_channels (`int`, *optional*, defaults to 3):
            Channels of the input images.
        out_channels (`int`, *optional*, defaults to 3):
            Channels of the reconstructed images.
        base_channels (`int`, *optional*, defaults to 128):
            Width of the first level (`ch` in taming). For `"simple_cnn"`, the width of its first two convolutions.
        channel_multipliers (`list[int]`, *optional*, defaults to `[1, 1, 2, 2, 4]`):
            Width multiplier of each resolution level (`ch_mult`). There are `len(channel_multipliers) - 1`
            downsamplings, so the downsampling factor is `2 ** (len(channel_multipliers) - 1)`. For `"simple_cnn"`
            it must have three entries (two downsamplings).
        num_res_blocks (`int`, *optional*, defaults to 2):
            Residual blocks per level of the encoder (the decoder has one more per level). Unused by `"simple_cnn"`.
        attn_resolutions (`list[int]`, *optional*, defaults to `[16]`):
            Feature-map sizes (relative to `resolution`) at which self-attention follows each residual block.
        resolution (`int`, *optional*, defaults to 256):
            Nominal training resolution; with `attn_resolutions` it places the attention blocks. Other input sizes
            work as long as they are divisible by the downsampling factor.
        latent_channels (`int`, *optional*, defaults to 256):
            Channels at the encoder output and decoder input (`z_channels`).
        dropout (`float`, *optional*, defaults to 0.0):
            Dropout inside residual blocks.
        norm_num_groups (`int`, *optional*, defaults to 32):
            GroupNorm groups of the VQGAN backbone.
        norm_eps (`float`, *optional*, defaults to 1e-6):
            GroupNorm epsilon of the VQGAN backbone.
        use_quant_conv (`bool`, *optional*, defaults to `True`):
            Whether 1x1 convolutions map `latent_channels` to `embed_dim` before quantization and back after
            (`quant_conv` / `post_quant_conv`, the original `use_connector`). Without them `embed_dim` must equal
            `latent_channels`.
        embed_dim (`int`, *optional*, defaults to 256):
            Channels of the quantized latents (`e_dim`). Each position is split into `num_heads` chunks of
            `embed_dim // num_heads` channels, each quantized by the shared codebook.
        codebook_size (`int`, *optional*, defaults to 16384):
            Number of codes (`n_e`).
        num_heads (`int`, *optional*, defaults to 4):
            Heads of the multi-head quantizer (MoVQ style); every position yields `num_heads` tokens.
        use_codebook_projection (`bool`, *optional*, defaults to `True`):
            Whether the codebook in use is a shared affine projection of the stored table (`use_proj`).
        quantizer_type (`str`, *optional*, defaults to `"optvq"`):
            `"optvq"` (Sinkhorn assignment during training), `"vq"` (nearest neighbour), `"otvae"` (OT-VAE:
            equipartition optimal-transport targets and Gumbel-softmax decoding, see [`OTVAEQuantizer`]), or any
            other name registered with [`~optvq_hf.quantization.register_quantizer`].
        epsilon (`float`, *optional*, defaults to 10.0):
            Sinkhorn inverse temperature.
        num_iters (`int`, *optional*, defaults to 5):
            Sinkhorn iterations.
        normalization (`str`, *optional*, defaults to `"all"`):
            Normalization of the distance matrix before Sinkhorn: `"all"`, `"dim"` or `"none"`.
        commitment_weight (`float`, *optional*, defaults to 1.0):
            Weight of `mean((z - sg(c))^2)`, the term that pulls encoder outputs to their codes.
        beta (`float`, *optional*, defaults to 0.25):
            Weight of `mean((c - sg(z))^2)`, the term that moves codes. These are the original code's weights; the
            paper's Eq. (4) writes `beta` on the other term.
        quantization_loss (`str`, *optional*, defaults to `"l2"`):
            The form of the quantization loss, as the original code's `loss_q_type`: `"l2"` (the two weighted terms
            above), `"l1"` (the same with absolute values) or `"ce"` (`cross_entropy(-D, ids)`: `D` the Euclidean
            distances of each row to every code, `ids` the assigned codes; `commitment_weight` and `beta` do not
            apply). The original's OptVQ configs use `"l2"`, its plain-VQ configs `"ce"` (the `vq-*` presets).
            `"otvae"` has a loss of its own and ignores it.
        inference_assignment (`str`, *optional*, defaults to `"nearest"`):
            How tokens are chosen in eval mode: `"nearest"` (batch-independent, deterministic) or `"sinkhorn"` (the
            original code's behaviour: an image's tokens depend on the rest of its batch). Training always uses the
            configured quantizer.
        gumbel_temperature (`float`, *optional*, defaults to 1.0):
            `"otvae"` only: temperature of the Gumbel-softmax sample decoded during training.
        gumbel_hard (`bool`, *optional*, defaults to `False`):
            `"otvae"` only: decode a straight-through one-hot Gumbel sample instead of the soft one.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Unused by the backbones (PyTorch's default init, as the original code); kept for transformers tooling.
    """

    model_type = "optvq"

    def __init__(
        self,
        architecture: str = "vqgan",
        in_channels: int = 3,
        out_channels: int = 3,
        base_channels: int = 128,
        channel_multipliers: list[int] | tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: list[int] | tuple[int, ...] = (16,),
        resolution: int = 256,
        latent_channels: int = 256,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        use_quant_conv: bool = True,
        embed_dim: int = 256,
        codebook_size: int = 16384,
        num_heads: int = 4,
        use_codebook_projection: bool = True,
        quantizer_type: str = "optvq",
        epsilon: float = 10.0,
        num_iters: int = 5,
        normalization: str = "all",
        commitment_weight: float = 1.0,
        beta: float = 0.25,
        quantization_loss: str = "l2",
        inference_assignment: str = "nearest",
        gumbel_temperature: float = 1.0,
        gumbel_hard: bool = False,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.architecture = architecture
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.base_channels = base_channels
        self.channel_multipliers = list(channel_multipliers)
        self.num_res_blocks = num_res_blocks
        self.attn_resolutions = list(attn_resolutions)
        self.resolution = resolution
        self.latent_channels = latent_channels
        self.dropout = dropout
        self.norm_num_groups = norm_num_groups
        self.norm_eps = norm_eps
        self.use_quant_conv = use_quant_conv
        self.embed_dim = embed_dim
        self.codebook_size = codebook_size
        self.num_heads = num_heads
        self.use_codebook_projection = use_codebook_projection
        self.quantizer_type = quantizer_type
        self.epsilon = epsilon
        self.num_iters = num_iters
        self.normalization = normalization
        self.commitment_weight = commitment_weight
        self.beta = beta
        self.quantization_loss = quantization_loss
        self.inference_assignment = inference_assignment
        self.gumbel_temperature = gumbel_temperature
        self.gumbel_hard = gumbel_hard
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self.validate()

    def validate(self):
        """Raise a `ValueError` naming the offending field if the configuration cannot describe a model."""
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"`architecture` must be one of {ARCHITECTURES}, got {self.architecture!r}.")
        quantizer_class = get_quantizer_class(self.quantizer_type)  # raises, naming the registered types
        if self.inference_assignment not in INFERENCE_ASSIGNMENTS:
            raise ValueError(
                f"`inference_assignment` must be one of {INFERENCE_ASSIGNMENTS}, got {self.inference_assignment!r}."
            )
        if self.quantization_loss not in QUANTIZATION_LOSSES:
            raise ValueError(
                f"`quantization_loss` must be one of {QUANTIZATION_LOSSES}, got {self.quantization_loss!r}."
            )
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"`normalization` must be one of {NORMALIZATIONS}, got {self.normalization!r}.")
        for name in ("in_channels", "out_channels", "base_channels", "latent_channels", "embed_dim", "codebook_size",
                     "num_heads", "resolution"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"`embed_dim` ({self.embed_dim}) must be divisible by `num_heads` ({self.num_heads}): each head "
                f"quantizes embed_dim // num_heads channels."
            )
        if not self.channel_multipliers or any(int(m) < 1 for m in self.channel_multipliers):
            raise ValueError(f"`channel_multipliers` must be non-empty positive integers, got {self.channel_multipliers}.")
        if self.architecture == "simple_cnn" and len(self.channel_multipliers) != 3:
            raise ValueError(
                "The 'simple_cnn' backbone has two downsamplings: `channel_multipliers` needs 3 entries, got "
                f"{self.channel_multipliers}."
            )
        if not self.use_quant_conv and self.embed_dim != self.latent_channels:
            raise ValueError(
                f"Without `use_quant_conv`, `embed_dim` ({self.embed_dim}) must equal `latent_channels` "
                f"({self.latent_channels})."
            )
        if self.architecture == "vqgan":
            widths = [self.base_channels * m for m in self.channel_multipliers] + [self.base_channels]
            bad = [w for w in widths if w % self.norm_num_groups]
            if bad:
                raise ValueError(
                    f"Every VQGAN level width must be divisible by `norm_num_groups` ({self.norm_num_groups}); "
                    f"got widths {sorted(set(bad))}."
                )
        if self.epsilon <= 0:
            raise ValueError(f"`epsilon` must be positive, got {self.epsilon}.")
        if self.num_iters < 0:
            raise ValueError(f"`num_iters` must be >= 0, got {self.num_iters}.")
        if not self.gumbel_temperature > 0:
            raise ValueError(f"`gumbel_temperature` must be positive, got {self.gumbel_temperature}.")
        quantizer_class.validate_config(self)

    @property
    def downsample_factor(self) -> int:
        """Ratio between image size and latent grid size."""
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def code_dim(self) -> int:
        """Size of one code vector: `embed_dim // num_heads`."""
        return self.embed_dim // self.num_heads

    @classmethod
    def available_presets(cls) -> list[str]:
        """Names accepted by [`OptVQConfig.from_preset`]."""
        return sorted(PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "OptVQConfig":
        """Build the configuration of one of the paper's settings, e.g. `"optvq-imagenet-16x16x4"` or `"optvq-mnist"`.

        Args:
            name (`str`): a name from [`OptVQConfig.available_presets`].
            overrides: any field to change, e.g. `codebook_size=4096`.
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; available presets: {', '.join(sorted(PRESETS))}.")
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})


#: The fields of an [`OptVQConfig`] (its constructor's parameters): what every front end stores and converts.
OPTVQ_CONFIG_FIELDS = tuple(name for name in inspect.signature(OptVQConfig.__init__).parameters
                            if name not in ("self", "kwargs"))


def __getattr__(name):
    if name == "QUANTIZER_TYPES":  # the registry replaced the fixed tuple
        return available_quantizer_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
