"""The quantizer family: OptVQ (Sinkhorn assignment) and vanilla nearest-neighbour VQ, one implementation.

Both are plain `nn.Module`s usable on their own::

    quantizer = OptVQQuantizer(dim=64, codebook_size=1024, num_heads=4)
    out = quantizer(features)          # (B, C, H, W) or (B, T, C)
    out.quantized, out.loss, out.token_ids
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from .sinkhorn import (
    DEFAULT_DENSE_LIMIT,
    VALID_NORMALIZATIONS,
    SinkhornWorkspace,
    dense_nearest_assign,
    dense_sinkhorn_assign,
    euclidean_argmin,
    sinkhorn_assign,
)

__all__ = ["QuantizerOutput", "OptVQQuantizer", "VectorQuantizer", "nearest_assign", "build_quantizer"]

ASSIGNMENTS = ("sinkhorn", "nearest")


@dataclass
class QuantizerOutput(ModelOutput):
    """Output of a quantizer.

    Args:
        quantized (`torch.FloatTensor`, same shape as the input):
            Quantized features with straight-through gradients (`z + sg(c - z)`), in the input's dtype.
        loss (`torch.FloatTensor` of shape `()`):
            `commitment_weight * mean((z - sg(c))^2) + beta * mean((c - sg(z))^2)`, in float32.
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


class OptVQQuantizer(nn.Module):
    r"""Multi-head vector quantizer whose training assignment is OptVQ's Sinkhorn optimal transport.

    Each position's `dim` channels are split into `num_heads` contiguous chunks of `dim // num_heads` channels
    (head `k` owns channels `[k*d, (k+1)*d)`); all heads share one codebook of `codebook_size` codes. All rows of a
    call (batch x positions x heads) are assigned jointly by Sinkhorn over their Euclidean distance matrix.
    Computation runs in float32 even under autocast; the output has the input's dtype.

    Args:
        dim (`int`): channels of the features to quantize.
        codebook_size (`int`): number of codes.
        num_heads (`int`, defaults to 1): heads; `dim` must be divisible by it.
        use_projection (`bool`, defaults to `True`): the codebook in use is `Linear(embedding.weight)`, a shared
            affine transform of the stored table.
        epsilon (`float`, defaults to 10.0): Sinkhorn inverse temperature.
        num_iters (`int`, defaults to 5): Sinkhorn iterations.
        normalization (`str`, defaults to `"all"`): distance normalization, `"all"`, `"dim"` or `"none"`.
        commitment_weight (`float`, defaults to 1.0): weight of `mean((z - sg(c))^2)`.
        beta (`float`, defaults to 0.25): weight of `mean((c - sg(z))^2)` (the original code's convention; the
            paper's Eq. 4 swaps the two weights).
        inference_assignment (`str`, defaults to `"nearest"`): assignment in eval mode, `"nearest"` or `"sinkhorn"`.
        training_assignment (`str`, defaults to `"sinkhorn"`): assignment in train mode.
        sinkhorn_streaming (`bool` or `"auto"`, defaults to `"auto"`): `streaming` of
            [`~optvq_hf.sinkhorn.sinkhorn_assign`]: `False` caches one `(N, K)` distance matrix, `True` recomputes
            distances block by block (memory `O((N + K) d + block)`), `"auto"` streams above `sinkhorn_dense_limit`.
        sinkhorn_dense_limit (`int`, defaults to `2**28`): largest `N * K` that `"auto"` caches. The cache lives in
            a [`~optvq_hf.sinkhorn.SinkhornWorkspace`] kept by the module (`sinkhorn_workspace`) and reused from
            step to step; `sinkhorn_workspace.release()` frees it (it is never saved or copied).
        sync_across_ranks (`bool`, defaults to `True`): in training, when `torch.distributed` is initialized with
            more than one rank, the Sinkhorn plan covers the global batch (statistics and marginals all-reduced over
            `process_group`, the default group unless set), as one process would on the concatenated batch. Every
            rank must then run the quantizer's training forward together.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        num_heads: int = 1,
        use_projection: bool = True,
        epsilon: float = 10.0,
        num_iters: int = 5,
        normalization: str = "all",
        commitment_weight: float = 1.0,
        beta: float = 0.25,
        inference_assignment: str = "nearest",
        training_assignment: str = "sinkhorn",
        sinkhorn_streaming: bool | str = "auto",
        sinkhorn_dense_limit: int = DEFAULT_DENSE_LIMIT,
        sync_across_ranks: bool = True,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"`dim` ({dim}) must be divisible by `num_heads` ({num_heads}).")
        if codebook_size < 1:
            raise ValueError(f"`codebook_size` must be >= 1, got {codebook_size}.")
        if normalization not in VALID_NORMALIZATIONS:
            raise ValueError(f"`normalization` must be one of {VALID_NORMALIZATIONS}, got {normalization!r}.")
        for name, value in (("inference_assignment", inference_assignment), ("training_assignment", training_assignment)):
            if value not in ASSIGNMENTS:
                raise ValueError(f"`{name}` must be one of {ASSIGNMENTS}, got {value!r}.")
        self.dim = dim
        self.codebook_size = codebook_size
        self.num_heads = num_heads
        self.code_dim = dim // num_heads
        self.epsilon = float(epsilon)
        self.num_iters = int(num_iters)
        self.normalization = normalization
        self.commitment_weight = float(commitment_weight)
        self.beta = float(beta)
        self.inference_assignment = inference_assignment
        self.training_assignment = training_assignment
        if sinkhorn_streaming not in ("auto", True, False):
            raise ValueError(f"`sinkhorn_streaming` must be 'auto', True or False, got {sinkhorn_streaming!r}.")
        self.sinkhorn_streaming = sinkhorn_streaming
        self.sinkhorn_dense_limit = int(sinkhorn_dense_limit)
        self.sync_across_ranks = bool(sync_across_ranks)
        self.process_group = None  # None: the default group when syncing
        self.sinkhorn_workspace = SinkhornWorkspace()

        self.embedding = nn.Embedding(codebook_size, self.code_dim)
        self.projection = nn.Linear(self.code_dim, self.code_dim) if use_projection else None
        self.reset_parameters()

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
            f"training_assignment={self.training_assignment!r}, inference_assignment={self.inference_assignment!r}"
        )

    @property
    def codebook(self) -> torch.Tensor:
        """The codes in use, `(codebook_size, dim // num_heads)`, in float32, differentiable."""
        table = self.embedding.weight.float()
        if self.projection is None:
            return table
        return nn.functional.linear(table, self.projection.weight.float(), self.projection.bias.float())

    @property
    def assignment(self) -> str:
        """The assignment this module uses now (depends on `self.training`)."""
        return self.training_assignment if self.training else self.inference_assignment

    def assign(self, features: torch.Tensor, codebook: torch.Tensor) -> torch.LongTensor:
        """Token of every row of `features` `(N, dim // num_heads)` under the current assignment."""
        if self.assignment == "sinkhorn":
            group = None
            if self.training and self.sync_across_ranks and torch.distributed.is_available() and (
                torch.distributed.is_initialized()
            ):
                group = self.process_group if self.process_group is not None else "world"
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
        if _is_compiling():
            return dense_nearest_assign(features, codebook)
        return nearest_assign(features, codebook)

    def _check_input(self, features: torch.Tensor):
        if features.ndim not in (3, 4):
            raise ValueError(
                f"{type(self).__name__} expects features of shape (B, C, H, W) or (B, T, C), got "
                f"{tuple(features.shape)}."
            )
        channels = features.shape[1] if features.ndim == 4 else features.shape[2]
        if channels != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects {self.dim} channels (dim), got {channels} in a tensor of shape "
                f"{tuple(features.shape)}."
            )
        if not features.is_floating_point():
            raise ValueError(f"Features must be floating point, got {features.dtype}.")
        if not _is_compiling() and not bool(torch.isfinite(features).all()):
            raise ValueError("Features contain NaN or Inf values.")

    def forward(self, features: torch.Tensor) -> QuantizerOutput:
        """Quantize `features` of shape `(B, C, H, W)` or `(B, T, C)`; returns a [`QuantizerOutput`]."""
        self._check_input(features)
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

    def quantize_rows(self, flat: torch.Tensor, codebook: torch.Tensor):
        """Quantize rows `(N, dim // num_heads)` in float32: returns `(quantized rows, loss, token ids)`.

        The one place a member of the family differs; `forward` handles layouts, heads, dtypes and statistics.
        """
        token_ids = self.assign(flat, codebook)
        chosen = nn.functional.embedding(token_ids, codebook)
        loss = self.commitment_weight * torch.mean((flat - chosen.detach()) ** 2) + self.beta * torch.mean(
            (chosen - flat.detach()) ** 2
        )
        return flat + (chosen - flat).detach(), loss, token_ids

    @torch.no_grad()
    def _statistics(self, token_ids: torch.Tensor):
        counts = torch.zeros(self.codebook_size, device=token_ids.device, dtype=torch.float32)
        counts.scatter_add_(0, token_ids, torch.ones_like(token_ids, dtype=torch.float32))
        probabilities = counts / counts.sum().clamp_min(1.0)
        entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum()
        usage = (counts > 0).float().mean()
        return counts, entropy.exp(), usage

    def check_token_ids(self, token_ids: torch.Tensor, layout: str = "image"):
        """Raise a `ValueError` if `token_ids` is not an integer tensor of valid codes in the given layout."""
        if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool or token_ids.is_complex():
            raise ValueError(f"Token ids must be an integer tensor, got dtype {token_ids.dtype}.")
        expected = "(B, num_heads, H, W)" if layout == "image" else "(B, T, num_heads)"
        head_axis = 1 if layout == "image" else 2
        if token_ids.ndim != (4 if layout == "image" else 3) or token_ids.shape[head_axis] != self.num_heads:
            raise ValueError(
                f"Token ids must have shape {expected} with num_heads={self.num_heads}, got {tuple(token_ids.shape)}."
            )
        if token_ids.numel() and not _is_compiling():
            low, high = int(token_ids.min()), int(token_ids.max())
            if low < 0 or high >= self.codebook_size:
                raise ValueError(
                    f"Token ids must lie in [0, {self.codebook_size - 1}] (codebook_size={self.codebook_size}), got "
                    f"values in [{low}, {high}]."
                )

    def embed_tokens(self, token_ids: torch.LongTensor) -> torch.FloatTensor:
        """Look token ids up in the codebook and put head `k`'s code back in channels `[k*d, (k+1)*d)`.

        Args:
            token_ids (`torch.LongTensor`): `(B, num_heads, H, W)` (gives `(B, dim, H, W)`) or `(B, T, num_heads)`
                (gives `(B, T, dim)`).
        """
        layout = "image" if token_ids.ndim == 4 else "sequence"
        self.check_token_ids(token_ids, layout)
        codebook = self.codebook
        if layout == "image":
            batch, _, height, width = token_ids.shape
            codes = nn.functional.embedding(token_ids.permute(0, 2, 3, 1).long(), codebook)  # (B, H, W, heads, d)
            return codes.reshape(batch, height, width, self.dim).permute(0, 3, 1, 2)
        batch, length, _ = token_ids.shape
        return nn.functional.embedding(token_ids.long(), codebook).reshape(batch, length, self.dim)


class VectorQuantizer(OptVQQuantizer):
    """Vanilla VQ: nearest-neighbour assignment in training and inference (the baseline of the paper's tables).

    Takes the same arguments as [`OptVQQuantizer`] except the Sinkhorn ones and the assignments.
    """

    def __init__(self, dim: int, codebook_size: int, num_heads: int = 1, use_projection: bool = True,
                 commitment_weight: float = 1.0, beta: float = 0.25):
        super().__init__(
            dim,
            codebook_size,
            num_heads=num_heads,
            use_projection=use_projection,
            commitment_weight=commitment_weight,
            beta=beta,
            inference_assignment="nearest",
            training_assignment="nearest",
        )


def build_quantizer(config) -> OptVQQuantizer:
    """The quantizer an [`OptVQConfig`] describes."""
    common = dict(
        dim=config.embed_dim,
        codebook_size=config.codebook_size,
        num_heads=config.num_heads,
        use_projection=config.use_codebook_projection,
        commitment_weight=config.commitment_weight,
        beta=config.beta,
    )
    if config.quantizer_type == "vq":
        return VectorQuantizer(**common)
    if config.quantizer_type == "optvq":
        return OptVQQuantizer(
            **common,
            epsilon=config.epsilon,
            num_iters=config.num_iters,
            normalization=config.normalization,
            inference_assignment=config.inference_assignment,
        )
    if config.quantizer_type == "otvae":
        from .otvae import OTVAEQuantizer

        return OTVAEQuantizer(
            **common,
            epsilon=config.epsilon,
            num_iters=config.num_iters,
            normalization=config.normalization,
            gumbel_temperature=getattr(config, "gumbel_temperature", 1.0),
            gumbel_hard=getattr(config, "gumbel_hard", False),
        )
    raise ValueError(f"Unknown quantizer_type {config.quantizer_type!r}.")
