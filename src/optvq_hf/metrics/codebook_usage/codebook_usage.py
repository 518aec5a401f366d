"""CodebookUsage: a codebook metric shipped with optvq-hf as an `evaluate` module (loadable offline by path).

`codebook_usage`, `perplexity` and `dead_codes` are one implementation ([`optvq_hf.metrics.base.TokenMetric`]) under
three names: each returns all the statistics of the code histogram.
"""

from optvq_hf.metrics import base


class CodebookUsage(base.TokenMetric):
    description = """Codebook usage: the fraction of codes used at least once over all token ids added (1.0 = every code
used).
Also returns the other statistics of the same histogram. Token ids are stored per image and the histogram is built
at compute time, so the result is exact over any batching and any number of processes."""
