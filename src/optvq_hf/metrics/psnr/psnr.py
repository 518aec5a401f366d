"""PSNR of image reconstructions, an `evaluate` metric shipped with optvq-hf (loadable offline by path)."""

import datasets
import numpy as np

from optvq_hf.metrics import base, functional

_DESCRIPTION = """Peak signal-to-noise ratio, `10 * log10(1 / mse)` per image on pixels mapped to [0, 1], averaged
over images (the convention of the OptVQ paper's tables). Also returns the PSNR of the dataset-wide mean squared
error. A perfect reconstruction counts as 100 dB (PSNR is otherwise infinite)."""

_INPUTS = "\n" + base.IMAGE_PAIR_ARGS + """Returns:
    psnr (`float`): mean per-image PSNR in dB.
    psnr_of_mean_mse (`float`): PSNR of the mean squared error over all pixels of all images.
    num_samples (`int`): number of images.
Example:
    >>> import optvq_hf.metrics, torch
    >>> psnr = optvq_hf.metrics.load("psnr")
    >>> psnr.compute(predictions=torch.zeros(2, 1, 8, 8), references=torch.full((2, 1, 8, 8), 0.2))["psnr"]
    20.0
"""

_CITATION = ""


class Psnr(base.PerImageMetric):
    statistics_features = {"psnr": datasets.Value("float64"), "mse": datasets.Value("float64")}
    description, inputs_description, citation = _DESCRIPTION, _INPUTS, _CITATION

    def image_statistics(self, predictions, references):
        mse = functional.per_image_mse(predictions, references)
        return {"psnr": functional.per_image_psnr(predictions, references).tolist(), "mse": mse.tolist()}

    def _compute(self, psnr, mse):
        mean_mse = functional.exact_mean(mse)
        floor = 10 ** (-functional.MAX_PSNR / 10)
        return {
            "psnr": functional.exact_mean(psnr),
            "psnr_of_mean_mse": float(10 * np.log10(1.0 / max(mean_mse, floor))),
            "num_samples": len(psnr),
        }
