"""The quantizer family: a neutral base, a registry keyed by `quantizer_type`, and two members.

[`CodebookQuantizer`] holds what every member shares: the codebook (table + optional shared projection), the head
split, the `(B, C, H, W)` / `(B, T, C)` layouts, float32 computation, batch statistics, token embedding, codebook
initialization and input checks. A member overrides the assignment (`assign`), or the whole row quantization
(`quantize_rows`: OT-VAE decodes a Gumbel-softmax sample), and registers itself under its `quantizer_type`:

* `"vq"`: [`VectorQuantizer`], nearest neighbour (the baseline of the paper's tables);
* `"optvq"`: [`OptVQQuantizer`], Sinkhorn optimal transport in training ([`~optvq_hf.sinkhorn.sinkhorn_assign`]);
* `"otvae"`: [`~optvq_hf.otvae.OTVAEQuantizer`], in `otvae.py`.

The config, model building, model cards and the example scripts read the registry, so a new member is one module
plus one `@register_quantizer(...)` (see docs/quantizer.md)::

    quantizer = OptVQQuantizer(dim=64, codebook_size=1024, num_heads=4)
    out = quantizer(features)          # (B, C, H, W) or (B, T, C)
    out.quantized, out.loss, out.token_ids
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers.utils import ModelOutput

from .codebook_losses import QUANTIZATION_LOSSES, absolute_error, distance_cross_entropy, squared_error
from .sinkhorn import (
    DEFAULT_DENSE_LIMIT,
    VALID_NORMALIZATIONS,
    SinkhornWorkspace,
    dense_nearest_assign,
    dense_sinkhorn_assign,
    euclidean_argmin,
    sinkhorn_assign,
)
from .validation import MAX_FEATURE_MAGNITUDE, check_finite, check_token_ids

__all__ = [
    "QuantizerOutput",
    "CodebookQuantizer",
    "OptVQQuantizer",
    "VectorQuantizer",
    "nearest_assign",
    "squared_error",
    "register_quantizer",
    "get_quantizer_class",
    "available_quantizer_types",
    "build_quantizer",
]

ASSIGNMENTS = ("sinkhorn", "nearest")


@dataclass
class QuantizerOutput(ModelOutput):
    """Output of a quantizer.

    Args:
        quantized (`torch.FloatTensor`, same shape as the input):
            Quantized features with straight-through gradients (`z + sg(c - z)`), in the input's dtype.
        loss (`torch.FloatTensor` of shape `()`):
            The quantizer's `quantization_loss` in float32: by default (`"l2"`)
            `commitment_weight * mean((z - sg(c))^2) + beta * mean((c - sg(z))^2)`.
        token_ids (`torch.LongTensor`):
            `(B, num_heads, H, W)` for `(B, C, H, W)` inputs, `(B, T, num_heads)` for `(B, T, C)` inputs.
        perplexity (`torch.FloatTensor` of shape `()`):
            `exp(entropy)` of the code histogram of this call (1 = one code, `codebook_size` = uniform).
        codebook_usage (`torch.FloatTensor` of shape `()`):
            Fraction of the codebook used by this call.
        code_counts (`torch.FloatTensor` of shape `(codebook_size,)`):
            How often each code was chosen in this call (for usage over a dataset, sum these).
    """

    quantized: torch.FloatTensor | None = None
    loss: torch.FloatTensor | None = None
    token_ids: torch.LongTensor | None = None
    perplexity: torch.FloatTensor | None = None
    codebook_usage: torch.FloatTensor | None = None
    code_counts: torch.FloatTensor | None = None


@torch.no_grad()
def nearest_assign(features: torch.Tensor, codebook: torch.Tensor) -> torch.LongTensor:
    """Index of the Euclidean-nearest code of every row of `features` `(N, d)` in `codebook` `(K, d)`.

    Computed block by block (never materializes the `N x K` distances); see `optvq_hf.sinkhorn.euclidean_argmin`.
    """
    return euclidean_argmin(features, codebook)


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


# ----------------------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------------------
_QUANTIZERS: dict[str, type] = {}


def register_quantizer(name: str, quantizer_class: type | None = None):
    """Register a [`CodebookQuantizer`] subclass under `quantizer_type=name`; usable as a class decorator.

    Once registered, `OptVQConfig(quantizer_type=name)` validates, `OptVQModel` / `OptVQVQModel` build the member
    with its `from_config`, model cards describe it and the example scripts train and evaluate it. Registering a
    name again with a class of the same module and qualified name (a re-run cell) replaces it; another class raises.
    """

    def register(cls):
        if not (isinstance(cls, type) and issubclass(cls, CodebookQuantizer)):
            raise ValueError(f"Only CodebookQuantizer subclasses can be registered, got {cls!r}.")
        existing = _QUANTIZERS.get(name)
        if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"quantizer_type {name!r} is already registered to {existing.__qualname__}.")
        cls.quantizer_type = name
        _QUANTIZERS[name] = cls
        return cls

    if not isinstance(name, str) or not name:
        raise ValueError(f"A quantizer_type must be a non-empty string, got {name!r}.")
    return register if quantizer_class is None else register(quantizer_class)


def available_quantizer_types() -> tuple[str, ...]:
    """The registered `quantizer_type` names, in registration order."""
    return tuple(_QUANTIZERS)


def get_quantizer_class(quantizer_type: str) -> type:
    """The [`CodebookQuantizer`] subclass registered under `quantizer_type` (`ValueError` if none is)."""
    if quantizer_type not in _QUANTIZERS:
        raise ValueError(
            f"`quantizer_type` must be one of {available_quantizer_types()}, got {quantizer_type!r} (register a new "
            "member with `optvq_hf.register_quantizer`)."
        )
    return _QUANTIZERS[quantizer_type]


def build_quantizer(config) -> "CodebookQuantizer":
    """The quantizer an [`OptVQConfig`] describes: `get_quantizer_class(config.quantizer_type).from_config(config)`."""
    return get_quantizer_class(config.quantizer_type).from_config(config)


# ----------------------------------------------------------------------------------------------------------------
# The neutral base
# ----------------------------------------------------------------------------------------------------------------
class CodebookQuantizer(nn.Module):
    r"""Base of the quantizer family: a multi-head codebook quantizer whose members differ only in how rows are
    assigned to codes.

    Each position's `dim` channels are split into `num_heads` contiguous chunks of `dim // num_heads` channels
    (head `k` owns channels `[k*d, (k+1)*d)`); all heads share one codebook of `codebook_size` codes. `forward`
    flattens any `(B, C, H, W)` or `(B, T, C)` input into rows `(B * positions * heads, d)` (heads innermost), runs
    [`~CodebookQuantizer.quantize_rows`] in float32 (even under autocast), computes the batch statistics and puts
    everything back in the input's layout and dtype.

    A member implements [`~CodebookQuantizer.assign`] (the default `quantize_rows` then picks the assigned codes,
    adds the commitment / codebook loss and the straight-through estimator), or overrides `quantize_rows`
    altogether. The loss is the original code's `quantization_loss` form (`"l2"`, `"l1"` or `"ce"`, see
    `optvq_hf.codebook_losses`); the `"l2"` / `"l1"` terms are `loss_form(features, codes)`.

    Args:
        dim (`int`): channels of the features to quantize.
        codebook_size (`int`): number of codes.
        num_heads (`int`, defaults to 1): heads; `dim` must be divisible by it.
        use_projection (`bool`, defaults to `True`): the codebook in use is `Linear(embedding.weight)`, a shared
            affine transform of the stored table.
        commitment_weight (`float`, defaults to 1.0): weight of `loss_form(z, sg(c))` (`"l2"`, `"l1"`).
        beta (`float`, defaults to 0.25): weight of `loss_form(sg(z), c)` (`"l2"`, `"l1"`; the original code's
            convention; the paper's Eq. 4 swaps the two weights).
        quantization_loss (`str`, defaults to `"l2"`): the loss form, as the original's `loss_q_type`: `"l2"`
            (`commitment_weight * mean((z - sg(c))^2) + beta * mean((sg(z) - c)^2)`), `"l1"` (the same with
            absolute values) or `"ce"` (`cross_entropy(-D, ids)` with `D` the Euclidean distances of each row to
            every code and `ids` the assigned codes; neither weight applies, as in the original).
        sync_across_ranks (`bool`, defaults to `True`): in training, when `torch.distributed` is initialized with
            more than one rank, members whose assignment looks at the whole batch (OptVQ, OT-VAE) cover the global
            batch, all-reducing over `process_group` (the default group unless set). Every rank must then run the
            quantizer's training forward together. Eval mode never communicates.
    """

    #: The `quantizer_type` this class is registered under (set by [`register_quantizer`]).
    quantizer_type: ClassVar[str | None] = None
    #: Name for logs and summaries.
    display_name: ClassVar[str] = "quantizer"
    #: Inference assignments this member supports (`config.inference_assignment` values that change something).
    inference_assignments: ClassVar[tuple[str, ...]] = ("nearest",)
    #: Assignments in train and eval mode (instances may override; see `assignment`).
    training_assignment: str = "nearest"
    inference_assignment: str = "nearest"
    #: The `"l2"` loss form `f(features, codes) -> scalar` of the commitment and codebook terms (`"l1"` uses
    #: [`absolute_error`]).
    loss_form = staticmethod(squared_error)

    def __init__(self, dim: int, codebook_size: int, num_heads: int = 1, use_projection: bool = True,
                 commitment_weight: float = 1.0, beta: float = 0.25, sync_across_ranks: bool = True,
                 quantization_loss: str = "l2"):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"`dim` ({dim}) must be divisible by `num_heads` ({num_heads}).")
        if codebook_size < 1:
            raise ValueError(f"`codebook_size` must be >= 1, got {codebook_size}.")
        if quantization_loss not in QUANTIZATION_LOSSES:
            raise ValueError(f"`quantization_loss` must be one of {QUANTIZATION_LOSSES}, got {quantization_loss!r}.")
        self.quantization_loss = quantization_loss
        self.dim = dim
        self.codebook_size = codebook_size
        self.num_heads = num_heads
        self.code_dim = dim // num_heads
        self.commitment_weight = float(commitment_weight)
        self.beta = float(beta)
        self.sync_across_ranks = bool(sync_across_ranks)
        self.process_group = None  # None: the default group when syncing
        self.embedding = nn.Embedding(codebook_size, self.code_dim)
        self.projection = nn.Linear(self.code_dim, self.code_dim) if use_projection else None
        self.reset_parameters()

    # ---- construction from a config ---------------------------------------------------------------------------
    @classmethod
    def config_kwargs(cls, config) -> dict:
        """The constructor arguments an [`OptVQConfig`] gives this member (members add their own fields)."""
        return dict(
            dim=config.embed_dim,
            codebook_size=config.codebook_size,
            num_heads=config.num_heads,
            use_projection=config.use_codebook_projection,
            commitment_weight=config.commitment_weight,
            beta=config.beta,
            quantization_loss=config.quantization_loss,
        )

    @classmethod
    def from_config(cls, config) -> "CodebookQuantizer":
        """Build the quantizer an [`OptVQConfig`] describes."""
        return cls(**cls.config_kwargs(config))

    @classmethod
    def validate_config(cls, config):
        """Member-specific checks of an [`OptVQConfig`] (raise `ValueError`); called by `OptVQConfig.validate`."""

    @classmethod
    def describe(cls, config) -> tuple[str, str]:
        """For model cards: (what quantizes the latents, how training assigns codes)."""
        return f"{cls.display_name} quantization", "nearest neighbour"

    @classmethod
    def resolved_inference_assignment(cls, config) -> str:
        """The assignment a model of this config uses in eval mode."""
        return config.inference_assignment if config.inference_assignment in cls.inference_assignments else "nearest"

    # ---- parameters -------------------------------------------------------------------------------------------
    def reset_parameters(self):
        """Initialize as the original code: table ~ N(0, 1), projection weight ~ N(0, 1/code_dim)."""
        nn.init.normal_(self.embedding.weight)
        if self.projection is not None:
            nn.init.normal_(self.projection.weight, std=self.code_dim**-0.5)
            bound = 1 / math.sqrt(self.code_dim)
            nn.init.uniform_(self.projection.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, num_heads={self.num_heads}, "
            f"training_assignment={self.training_assignment!r}, inference_assignment={self.inference_assignment!r}, "
            f"quantization_loss={self.quantization_loss!r}"
        )

    @property
    def codebook(self) -> torch.Tensor:
        """The codes in use, `(codebook_size, dim // num_heads)`, in float32, differentiable."""
        table = self.embedding.weight.float()
        if self.projection is None:
            return table
        return nn.functional.linear(table, self.projection.weight.float(), self.projection.bias.float())

    @torch.no_grad()
    def set_codebook(self, codes: torch.Tensor):
        """Make the codebook in use equal to `codes` `(codebook_size, dim // num_heads)` (codebook initialization).

        With a projection `c = W e + b`, the table becomes `e = W^{-1} (c - b)` so that the projection keeps its
        initialization; if `W` is singular the projection is reset to the identity and the table set to `codes`.
        """
        weight = self.embedding.weight
        if codes.shape != weight.shape:
            raise ValueError(
                f"`codes` must have shape {tuple(weight.shape)} (codebook_size, code_dim), got {tuple(codes.shape)}."
            )
        codes = codes.to(device=weight.device, dtype=torch.float32)
        if self.projection is None:
            weight.copy_(codes)
            return
        w, b = self.projection.weight.float(), self.projection.bias.float()
        table = None
        if torch.linalg.matrix_rank(w) == w.shape[0]:
            table = torch.linalg.solve(w, (codes - b).T).T
            if not torch.isfinite(table).all() or (table @ w.T + b - codes).abs().max() > 1e-3 * (1 + codes.abs().max()):
                table = None
        if table is None:
            self.projection.weight.copy_(torch.eye(w.shape[0], dtype=self.projection.weight.dtype))
            self.projection.bias.zero_()
            table = codes
        weight.copy_(table.to(weight.dtype))

    # ---- assignment -------------------------------------------------------------------------------------------
    @property
    def assignment(self) -> str:
        """The assignment this module uses now (depends on `self.training`)."""
        return self.training_assignment if self.training else self.inference_assignment

    def sync_group(self):
        """The process group a training assignment covers (`"world"` for the default one), or `None`: local rows."""
        if self.training and self.sync_across_ranks and torch.distributed.is_available() and (
            torch.distributed.is_initialized()
        ):
            return self.process_group if self.process_group is not None else "world"
        return None

    def assign(self, features: torch.Tensor, codebook: torch.Tensor) -> torch.LongTensor:
        """Token of every row of `features` `(N, dim // num_heads)`; members implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement `assign` or `quantize_rows`.")

    @staticmethod
    def nearest(features: torch.Tensor, codebook: torch.Tensor) -> torch.LongTensor:
        """Nearest code of every row (block by block; tensor ops only while `torch.compile` traces)."""
        return dense_nearest_assign(features, codebook) if _is_compiling() else nearest_assign(features, codebook)

    def quantize_rows(self, flat: torch.Tensor, codebook: torch.Tensor):
        """Quantize rows `(N, dim // num_heads)` in float32: returns `(quantized rows, loss, token ids)`.

        The default: `assign`, the chosen codes, the `quantization_loss` and the straight-through estimator.
        `forward` handles layouts, heads, dtypes and statistics.
        """
        token_ids = self.assign(flat, codebook)
        chosen = nn.functional.embedding(token_ids, codebook)
        return flat + (chosen - flat).detach(), self.codebook_loss(flat, codebook, token_ids, chosen), token_ids

    def codebook_loss(self, flat: torch.Tensor, codebook: torch.Tensor, token_ids: torch.LongTensor,
                      chosen: torch.Tensor) -> torch.Tensor:
        """The `quantization_loss` of rows `flat` assigned to `token_ids` (`chosen` = their codes), in float32."""
        if self.quantization_loss == "ce":
            if flat.shape[0] == 0:
                return flat.sum() * 0.0 + codebook.sum() * 0.0
            return distance_cross_entropy(flat, codebook, token_ids)
        form = absolute_error if self.quantization_loss == "l1" else self.loss_form
        return self.commitment_weight * form(flat, chosen.detach()) + self.beta * form(flat.detach(), chosen)

    # ---- forward ----------------------------------------------------------------------------------------------
    def check_input(self, features: torch.Tensor):
        """Raise a `ValueError` unless `features` is a finite float `(B, dim, H, W)` or `(B, T, dim)` tensor (the
        finiteness rule of `optvq_hf.validation.check_finite`)."""
        if not isinstance(features, torch.Tensor) or features.ndim not in (3, 4):
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"{type(self).__name__} expects features of shape (B, C, H, W) or (B, T, C), got {shape}.")
        channels = features.shape[1] if features.ndim == 4 else features.shape[2]
        if channels != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects {self.dim} channels (dim), got {channels} in a tensor of shape "
                f"{tuple(features.shape)}."
            )
        if not features.is_floating_point():
            raise ValueError(f"Features must be floating point, got {features.dtype}.")
        check_finite(features, "Features", self.training, MAX_FEATURE_MAGNITUDE)

    def forward(self, features: torch.Tensor, *, check_input: bool = True) -> QuantizerOutput:
        """Quantize `features` of shape `(B, C, H, W)` or `(B, T, C)`; returns a [`QuantizerOutput`].

        Args:
            features (`torch.FloatTensor`): the features.
            check_input (`bool`, defaults to `True`): validate `features`; a model that checked its own inputs
                passes `False`.
        """
        if check_input:
            self.check_input(features)
        input_dtype = features.dtype
        is_image = features.ndim == 4
        with torch.autocast(device_type=features.device.type, enabled=False):
            if is_image:
                batch, _, height, width = features.shape
                sequence = features.permute(0, 2, 3, 1).reshape(batch, height * width, self.dim)
            else:
                sequence = features
            batch, length, _ = sequence.shape
            flat = sequence.float().reshape(-1, self.code_dim)  # (B * T * heads, code_dim), heads innermost
            quantized, loss, token_ids = self.quantize_rows(flat, self.codebook)
            if not flat.numel():  # no rows (an empty batch): no loss rather than the NaN mean of nothing
                loss = flat.sum() * loss.nan_to_num(0.0)
            code_counts, perplexity, usage = self._statistics(token_ids)

        quantized = quantized.reshape(batch, length, self.dim).to(input_dtype)
        token_ids = token_ids.reshape(batch, length, self.num_heads)
        if is_image:
            quantized = quantized.reshape(batch, height, width, self.dim).permute(0, 3, 1, 2)
            token_ids = token_ids.reshape(batch, height, width, self.num_heads).permute(0, 3, 1, 2)
        return QuantizerOutput(
            quantized=quantized,
            loss=loss,
            token_ids=token_ids,
            perplexity=perplexity,
            codebook_usage=usage,
            code_counts=code_counts,
        )

    @torch.no_grad()
    def _statistics(self, token_ids: torch.Tensor):
        counts = torch.zeros(self.codebook_size, device=token_ids.device, dtype=torch.float32)
        counts.scatter_add_(0, token_ids, torch.ones_like(token_ids, dtype=torch.float32))
        probabilities = counts / counts.sum().clamp_min(1.0)
        entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum()
        usage = (counts > 0).float().mean()
        return counts, entropy.exp(), usage

    # ---- tokens -----------------------------------------------------------------------------------------------
    def check_token_ids(self, token_ids: torch.Tensor, layout: str = "image"):
        """Raise a `ValueError` if `token_ids` is not an integer tensor of valid codes in the given layout."""
        check_token_ids(token_ids, None)  # type and dtype first, the range after the shape
        expected = "(B, num_heads, H, W)" if layout == "image" else "(B, T, num_heads)"
        head_axis = 1 if layout == "image" else 2
        if token_ids.ndim != (4 if layout == "image" else 3) or token_ids.shape[head_axis] != self.num_heads:
            raise ValueError(
                f"Token ids must have shape {expected} with num_heads={self.num_heads}, got {tuple(token_ids.shape)}."
            )
        check_token_ids(token_ids, self.codebook_size)

    def embed_tokens(self, token_ids: torch.LongTensor, *, check_input: bool = True) -> torch.FloatTensor:
        """Look token ids up in the codebook and put head `k`'s code back in channels `[k*d, (k+1)*d)`.

        Args:
            token_ids (`torch.LongTensor`): `(B, num_heads, H, W)` (gives `(B, dim, H, W)`) or `(B, T, num_heads)`
                (gives `(B, T, dim)`).
            check_input (`bool`, defaults to `True`): validate `token_ids` (a model that checked them passes `False`).
        """
        layout = "image" if token_ids.ndim == 4 else "sequence"
        if check_input:
            self.check_token_ids(token_ids, layout)
        codebook = self.codebook
        if layout == "image":
            batch, _, height, width = token_ids.shape
            codes = nn.functional.embedding(token_ids.permute(0, 2, 3, 1).long(), codebook)  # (B, H, W, heads, d)
            return codes.reshape(batch, height, width, self.dim).permute(0, 3, 1, 2)
        batch, length, _ = token_ids.shape
        return nn.functional.embedding(token_ids.long(), codebook).reshape(batch, length, self.dim)


# ----------------------------------------------------------------------------------------------------------------
# Members
# ----------------------------------------------------------------------------------------------------------------
class _OptVQQuantizerType(type):
    """Keeps `isinstance(x, OptVQQuantizer)` true, with a `FutureWarning`, for the members that used to derive from
    `OptVQQuantizer` (`VectorQuantizer`, `OTVAEQuantizer`): test against [`CodebookQuantizer`] instead."""

    def __instancecheck__(cls, instance):
        return cls.__subclasscheck__(type(instance))

    def __subclasscheck__(cls, subclass):
        if type.__subclasscheck__(cls, subclass):
            return True
        legacy = cls.__name__ == "OptVQQuantizer" and getattr(subclass, "_legacy_optvq_subclass", False)
        if legacy:
            warnings.warn(
                f"{subclass.__name__} no longer derives from OptVQQuantizer; test against "
                "optvq_hf.CodebookQuantizer for any member of the quantizer family.",
                FutureWarning,
                stacklevel=3,
            )
        return legacy


@register_quantizer("optvq")
class OptVQQuantizer(CodebookQuantizer, metaclass=_OptVQQuantizerType):
    r"""Multi-head vector quantizer whose training assignment is OptVQ's Sinkhorn optimal transport.

    All rows of a call (batch x positions x heads) are assigned jointly by Sinkhorn over their Euclidean distance
    matrix ([`~optvq_hf.sinkhorn.sinkhorn_assign`]). Takes [`CodebookQuantizer`]'s arguments plus:

    Args:
        epsilon (`float`, defaults to 10.0): Sinkhorn inverse temperature.
        num_iters (`int`, defaults to 5): Sinkhorn iterations.
        normalization (`str`, defaults to `"all"`): distance normalization, `"all"`, `"dim"` or `"none"`.
        inference_assignment (`str`, defaults to `"nearest"`): assignment in eval mode, `"nearest"` or `"sinkhorn"`.
        training_assignment (`str`, defaults to `"sinkhorn"`): assignment in train mode.
        sinkhorn_streaming (`bool` or `"auto"`, defaults to `"auto"`): `streaming` of
            [`~optvq_hf.sinkhorn.sinkhorn_assign`]: `False` caches one `(N, K)` distance matrix, `True` recomputes
            distances block by block (memory `O((N + K) d + block)`), `"auto"` streams above `sinkhorn_dense_limit`.
        sinkhorn_dense_limit (`int`, defaults to `2**28`): largest `N * K` that `"auto"` caches. The cache lives in
            a [`~optvq_hf.sinkhorn.SinkhornWorkspace`] kept by the module (`sinkhorn_workspace`) and reused from
            step to step; `sinkhorn_workspace.release()` frees it (it is never saved or copied).
    """

    display_name = "OptVQ"
    inference_assignments = ("nearest", "sinkhorn")

    def __init__(self, dim: int, codebook_size: int, num_heads: int = 1, use_projection: bool = True,
                 epsilon: float = 10.0, num_iters: int = 5, normalization: str = "all", commitment_weight: float = 1.0,
                 beta: float = 0.25, inference_assignment: str = "nearest", training_assignment: str = "sinkhorn",
                 sinkhorn_streaming: bool | str = "auto", sinkhorn_dense_limit: int = DEFAULT_DENSE_LIMIT,
                 sync_across_ranks: bool = True, quantization_loss: str = "l2"):
        super().__init__(dim, codebook_size, num_heads=num_heads, use_projection=use_projection,
                         commitment_weight=commitment_weight, beta=beta, sync_across_ranks=sync_across_ranks,
                         quantization_loss=quantization_loss)
        if normalization not in VALID_NORMALIZATIONS:
            raise ValueError(f"`normalization` must be one of {VALID_NORMALIZATIONS}, got {normalization!r}.")
        for name, value in (("inference_assignment", inference_assignment), ("training_assignment", training_assignment)):
            if value not in ASSIGNMENTS:
                raise ValueError(f"`{name}` must be one of {ASSIGNMENTS}, got {value!r}.")
        if sinkhorn_streaming not in ("auto", True, False):
            raise ValueError(f"`sinkhorn_streaming` must be 'auto', True or False, got {sinkhorn_streaming!r}.")
        self.epsilon = float(epsilon)
        self.num_iters = int(num_iters)
        self.normalization = normalization
        self.inference_assignment = inference_assignment
        self.training_assignment = training_assignment
        self.sinkhorn_streaming = sinkhorn_streaming
        self.sinkhorn_dense_limit = int(sinkhorn_dense_limit)
        self.sinkhorn_workspace = SinkhornWorkspace()

    @classmethod
    def config_kwargs(cls, config) -> dict:
        return dict(super().config_kwargs(config), epsilon=config.epsilon, num_iters=config.num_iters,
                    normalization=config.normalization, inference_assignment=config.inference_assignment)

    @classmethod
    def describe(cls, config) -> tuple[str, str]:
        return (
            f"optimal-transport assignment (Sinkhorn, epsilon={config.epsilon}, {config.num_iters} iterations, "
            f"`{config.normalization}` distance normalization)",
            "Sinkhorn optimal transport over the whole batch",
        )

    def assign(self, features: torch.Tensor, codebook: torch.Tensor) -> torch.LongTensor:
        """Token of every row of `features` `(N, dim // num_heads)` under the current assignment."""
        if self.assignment != "sinkhorn":
            return self.nearest(features, codebook)
        group = self.sync_group()
        if _is_compiling() and group is None:
            # Under torch.compile: the same algorithm with tensor ops only, so the graph does not break.
            return dense_sinkhorn_assign(features, codebook, self.epsilon, self.num_iters, self.normalization)
        engine = torch.compiler.disable(sinkhorn_assign) if _is_compiling() else sinkhorn_assign
        return engine(
            features,
            codebook,
            self.epsilon,
            self.num_iters,
            self.normalization,
            process_group=group,
            streaming=self.sinkhorn_streaming,
            dense_limit=self.sinkhorn_dense_limit,
            workspace=self.sinkhorn_workspace,
        )


@register_quantizer("vq")
class VectorQuantizer(CodebookQuantizer):
    """Vanilla VQ: nearest-neighbour assignment in training and inference (the baseline of the paper's tables).

    Takes [`CodebookQuantizer`]'s arguments.
    """

    display_name = "VQ"
    _legacy_optvq_subclass = True

    @classmethod
    def describe(cls, config) -> tuple[str, str]:
        return "nearest-neighbour vector quantization", "nearest neighbour"

    def assign(self, features: torch.Tensor, codebook: torch.Tensor) -> torch.LongTensor:
        return self.nearest(features, codebook)
