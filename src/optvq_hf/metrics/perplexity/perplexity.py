"""Perplexity: a codebook metric shipped with optvq-hf as an `evaluate` module (loadable offline by path)."""

import numpy as np

from optvq_hf.metrics import base, functional

_DESCRIPTION = """Perplexity of the code distribution, exp(entropy) of the histogram of all token ids added: 1 when a single code is used, codebook_size when all codes are used equally often. Also returns the usage and the dead-code count.
Token ids are stored per image and the histogram is built at compute time, so the result is exact over any
batching and any number of processes."""

_INPUTS = """
Init args:
    codebook_size (`int`): number of codes (required).
Args:
    predictions: token ids of a batch of images, integer array `(B, ...)` such as `(B, num_heads, h, w)`.
Returns:
    codebook_usage (`float`, fraction in [0, 1]), perplexity (`float`), dead_codes (`int`), used_codes (`int`),
    num_tokens (`int`), num_samples (`int`), code_counts (`list[int]`, length codebook_size).
"""


class Perplexity(base.TokenMetric):
    description = _DESCRIPTION
    inputs_description = _INPUTS

    def _compute(self, tokens):
        counts = functional.code_histogram(tokens, self.codebook_size)
        return {
            **functional.codebook_statistics(counts),
            "num_samples": len(tokens),
            "code_counts": counts.tolist(),
        }
