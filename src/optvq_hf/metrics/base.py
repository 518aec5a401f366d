"""The shared machinery of the `evaluate` modules in this package.

`evaluate.Metric` stores whatever `add_batch` receives in an Arrow table (one per process) and hands the gathered
table to `_compute` on process 0. Storing images would cost as much as the dataset, so these modules store
*per-image statistics* instead (a PSNR, an SSIM, an LPIPS distance, a feature vector, a list of token ids): `add_batch`
takes the images, turns them into one row per image, and writes those rows. Because every row depends on its image
only, the table holds the same rows whether the data came in one batch or many, from one process or several
(`evaluate.load(..., num_process=N, process_id=rank, experiment_id=...)`), and `_compute` reduces the rows in an
order-independent way (`math.fsum`, sorted features), so the result is the same to the last bit.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import numpy as np
import torch

from ..validation import check_token_ids
from .functional import code_histogram, codebook_statistics, to_unit_images

__all__ = ["PerImageMetric", "NetworkImageMetric", "TokenMetric", "TOKEN_INPUTS_DESCRIPTION", "IMAGE_PAIR_ARGS",
           "NETWORK_INIT_ARGS"]

# Pieces of the modules' `inputs_description`.
IMAGE_PAIR_ARGS = """Args:
    predictions: reconstructions, `(B, C, H, W)` or `(B, H, W)`, floats in `input_range` (default [-1, 1]) or uint8.
    references: originals, same shape.
"""
NETWORK_INIT_ARGS = """    device: where the network runs (default "cpu").
    batch_size: images per network call inside `add_batch` (default 64).
"""


def _metric_info(metric: evaluate.Metric, features: dict[str, Any]) -> evaluate.MetricInfo:
    """The `evaluate.MetricInfo` of one of our modules: its texts and the columns it stores."""
    return evaluate.MetricInfo(
        description=metric.description,
        citation=metric.citation,
        inputs_description=metric.inputs_description,
        features=datasets.Features(features),
    )


class PerImageMetric(evaluate.Metric):
    """Base of the image metrics: `add_batch(predictions=..., references=...)` with image batches.

    Subclasses define `statistics_features` (the stored columns), `description`, `citation`, `inputs_description`,
    and `image_statistics(predictions, references) -> dict[str, list]` (inputs already in `[0, 1]`, float64).

    Args:
        input_range (`tuple[float, float]`, defaults to `(-1.0, 1.0)`): range of float images (the model's outputs
            and `OptVQImageProcessor`'s `pixel_values` are in `[-1, 1]`); `uint8` images are read as `[0, 255]`.
        kwargs: `evaluate.EvaluationModule` arguments (`num_process`, `process_id`, `experiment_id`,
            `keep_in_memory`, `cache_dir`, ...).
    """

    statistics_features: dict[str, Any] = {}
    description = ""
    citation = ""
    inputs_description = ""

    def __init__(self, input_range: tuple[float, float] = (-1.0, 1.0), **kwargs):
        if len(tuple(input_range)) != 2 or not float(input_range[1]) > float(input_range[0]):
            raise ValueError(f"`input_range` must be (low, high) with high > low, got {input_range!r}.")
        self.input_range = (float(input_range[0]), float(input_range[1]))
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return _metric_info(self, self.statistics_features)

    def image_statistics(self, predictions: torch.Tensor, references: torch.Tensor) -> dict[str, list]:
        raise NotImplementedError

    def statistics(self, predictions, references) -> dict[str, list]:
        """The rows `add_batch` stores for a batch of images."""
        if predictions is None or references is None:
            raise ValueError(f"{type(self).__name__} needs both `predictions` and `references`.")
        predictions = to_unit_images(predictions, self.input_range, "predictions")
        references = to_unit_images(references, self.input_range, "references")
        if predictions.shape != references.shape:
            raise ValueError(
                f"`predictions` and `references` must have the same shape, got {tuple(predictions.shape)} and "
                f"{tuple(references.shape)}."
            )
        return self.image_statistics(predictions, references)

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch: `predictions` (reconstructions) and `references` (originals), `(B, C, H, W)` or `(B, H, W)`."""
        if kwargs:
            raise ValueError(f"Unexpected inputs {sorted(kwargs)}; {type(self).__name__} takes predictions and references.")
        super().add_batch(**self.statistics(predictions, references))

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one image pair, `(C, H, W)` or `(H, W)`."""
        self.add_batch(predictions=_one(prediction), references=_one(reference), **kwargs)

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Reduce everything added so far (plus `predictions`/`references` if given). `None` on processes > 0."""
        if predictions is not None or references is not None:
            self.add_batch(predictions=predictions, references=references)
        if self.writer is None:
            raise ValueError(f"Nothing to compute: call add_batch first or pass predictions and references.")
        return super().compute(**kwargs)


class NetworkImageMetric(PerImageMetric):
    """Base of the image metrics that run a network (LPIPS, rFID): where it runs and how many images per call.

    Args:
        device (`str` or `torch.device`, defaults to `"cpu"`): where the network runs.
        batch_size (`int`, defaults to 64): images per network call inside `add_batch`.
        kwargs: [`PerImageMetric`] arguments.
    """

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64, **kwargs):
        if int(batch_size) < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        self.device = device
        self.batch_size = int(batch_size)
        super().__init__(**kwargs)

    @torch.no_grad()
    def in_chunks(self, function, *images: torch.Tensor) -> torch.Tensor:
        """`function(*chunks)` over `batch_size` images at a time (float32, on `device`), outputs concatenated on CPU."""
        outputs = []
        for start in range(0, images[0].shape[0], self.batch_size):
            chunks = [x[start:start + self.batch_size].float().to(self.device) for x in images]
            outputs.append(function(*chunks).cpu())
        return torch.cat(outputs)


def _one(item):
    if item is None:
        return None
    tensor = item if isinstance(item, torch.Tensor) else torch.as_tensor(np.asarray(item))
    return tensor.unsqueeze(0)


TOKEN_INPUTS_DESCRIPTION = """
Init args:
    codebook_size (`int`): number of codes (required).
Args:
    predictions: token ids of a batch of images, integer array `(B, ...)` such as `(B, num_heads, h, w)`.
Returns:
    codebook_usage (`float`, fraction in [0, 1]), perplexity (`float`), dead_codes (`int`), used_codes (`int`),
    num_tokens (`int`), num_samples (`int`), code_counts (`list[int]`, length codebook_size).
"""


class TokenMetric(evaluate.Metric):
    """The codebook metrics (`codebook_usage`, `perplexity`, `dead_codes` are this one implementation under three
    names): `add_batch(predictions=token_ids)` with any shape `(B, ...)` of token ids; `compute` returns every
    statistic of [`~optvq_hf.metrics.functional.codebook_statistics`] plus `num_samples` and `code_counts`.

    Token ids are stored per image and the histogram is built at compute time, so the result is exact over any
    batching and any number of processes.

    Args:
        codebook_size (`int`): number of codes (required).
        kwargs: `evaluate.EvaluationModule` arguments.
    """

    description = ""
    citation = ""
    inputs_description = TOKEN_INPUTS_DESCRIPTION

    def __init__(self, codebook_size: int | None = None, **kwargs):
        if codebook_size is None or int(codebook_size) != codebook_size or codebook_size < 1:
            raise ValueError(f"`codebook_size` must be a positive integer, got {codebook_size!r}.")
        self.codebook_size = int(codebook_size)
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return _metric_info(self, {"tokens": datasets.Sequence(datasets.Value("int32"))})

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add the token ids of a batch of images, `(B, ...)` (e.g. `(B, num_heads, h, w)`)."""
        if predictions is None:
            raise ValueError("Pass the token ids as `predictions`.")
        if references is not None or kwargs:
            raise ValueError(f"{type(self).__name__} takes token ids as `predictions` only.")
        if isinstance(predictions, torch.Tensor):
            array = predictions.detach().cpu().numpy()
        else:
            array = np.asarray(predictions)
        if array.ndim < 1 or array.dtype.kind not in "iu":
            raise ValueError(f"Token ids must be an integer array (B, ...), got dtype {array.dtype}, shape {array.shape}.")
        array = array.reshape(array.shape[0], -1).astype(np.int64)
        check_token_ids(torch.from_numpy(array), self.codebook_size)
        super().add_batch(tokens=[row.astype(np.int32) for row in array])

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add the token ids of one image."""
        self.add_batch(predictions=_one(prediction), references=reference, **kwargs)

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Codebook statistics of all token ids added so far (plus `predictions` if given)."""
        if predictions is not None:
            self.add_batch(predictions=predictions, references=references)
        if self.writer is None:
            raise ValueError("Nothing to compute: call add_batch first or pass predictions.")
        return super().compute(**kwargs)

    def _compute(self, tokens):
        counts = code_histogram(tokens, self.codebook_size)
        return {**codebook_statistics(counts), "num_samples": len(tokens), "code_counts": counts.tolist()}
