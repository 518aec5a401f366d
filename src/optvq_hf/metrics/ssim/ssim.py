"""SSIM of image reconstructions, an `evaluate` metric shipped with optvq-hf (loadable offline by path)."""

import datasets

from optvq_hf.metrics import base, functional

_DESCRIPTION = """Structural similarity (Wang et al. 2004) per image on pixels mapped to [0, 1]: Gaussian window
(sigma 1.5, 11x11), K1 = 0.01, K2 = 0.03, population covariances, mean over valid windows and channels; averaged over
images. Matches `skimage.metrics.structural_similarity(..., data_range=1, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)`. Images must be at least 11x11."""

_INPUTS = "\n" + base.IMAGE_PAIR_ARGS + """Returns:
    ssim (`float`): mean per-image SSIM.
    num_samples (`int`): number of images.
"""

_CITATION = """@article{wang2004ssim, title={Image quality assessment: from error visibility to structural
similarity}, author={Wang, Zhou and Bovik, Alan C and Sheikh, Hamid R and Simoncelli, Eero P},
journal={IEEE Transactions on Image Processing}, volume={13}, number={4}, pages={600--612}, year={2004}}"""


class Ssim(base.PerImageMetric):
    statistics_features = {"ssim": datasets.Value("float64")}
    description, inputs_description, citation = _DESCRIPTION, _INPUTS, _CITATION

    def image_statistics(self, predictions, references):
        return {"ssim": functional.per_image_ssim(predictions, references).tolist()}

    def _compute(self, ssim):
        return {"ssim": functional.exact_mean(ssim), "num_samples": len(ssim)}
