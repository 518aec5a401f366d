"""Reconstruction FID, an `evaluate` metric shipped with optvq-hf (loadable offline by path)."""

import datasets
import numpy as np
import torch

from optvq_hf.metrics import base, functional, networks

_DESCRIPTION = """Reconstruction FID: the Fréchet distance between Gaussians fitted to the features of the
originals and of the reconstructions (Heusel et al. 2017). The feature network is given as an `nn.Module` or loaded
from a local folder / Hub repository (our Inception-v3 with `"model_type": "inception_v3"`, or any transformers
vision model); nothing is downloaded unless a Hub id is given. Per-image features are stored (float32), so the
result is the same however the images were batched or split across processes. FID is biased for small sets: compare
numbers computed on the same number of images."""

_INPUTS = """
Init args:
    feature_extractor: `nn.Module` / `ImageFeatureExtractor`, or a local folder / Hub id (required).
""" + base.NETWORK_INIT_ARGS + base.IMAGE_PAIR_ARGS + """Returns:
    rfid (`float`), num_samples (`int`), feature_dim (`int`).
"""

_CITATION = """@inproceedings{heusel2017fid, title={GANs Trained by a Two Time-Scale Update Rule Converge to a Local
Nash Equilibrium}, author={Heusel, Martin and Ramsauer, Hubert and Unterthiner, Thomas and Nessler, Bernhard and
Hochreiter, Sepp}, booktitle={NeurIPS}, year={2017}}"""


class Rfid(base.NetworkImageMetric):
    statistics_features = {
        "prediction_features": datasets.Sequence(datasets.Value("float32")),
        "reference_features": datasets.Sequence(datasets.Value("float32")),
    }
    description, inputs_description, citation = _DESCRIPTION, _INPUTS, _CITATION

    def __init__(self, feature_extractor=None, **kwargs):
        if feature_extractor is None:
            raise ValueError("rFID needs `feature_extractor=`: an nn.Module, or a local folder or Hub id holding one.")
        super().__init__(**kwargs)
        self.feature_extractor = networks.load_feature_extractor(feature_extractor, device=self.device)

    def _features(self, images):
        features = self.in_chunks(self.feature_extractor, images).float()
        if not bool(torch.isfinite(features).all()):
            raise ValueError("The feature extractor returned NaN or Inf features.")
        return [row.numpy() for row in features]

    def image_statistics(self, predictions, references):
        return {"prediction_features": self._features(predictions),
                "reference_features": self._features(references)}

    def _compute(self, prediction_features, reference_features):
        fake = np.asarray(prediction_features, dtype=np.float64)
        real = np.asarray(reference_features, dtype=np.float64)
        if fake.shape[0] < 2:
            raise ValueError(f"rFID needs at least 2 images, got {fake.shape[0]}.")
        mu_fake, sigma_fake = functional.mean_and_covariance(fake)
        mu_real, sigma_real = functional.mean_and_covariance(real)
        return {
            "rfid": functional.frechet_distance(mu_real, sigma_real, mu_fake, sigma_fake),
            "num_samples": int(fake.shape[0]),
            "feature_dim": int(fake.shape[1]),
        }
