"""LPIPS of image reconstructions, an `evaluate` metric shipped with optvq-hf (loadable offline by path)."""

import datasets
import torch

from optvq_hf.metrics import base, functional, networks

_DESCRIPTION = """Learned perceptual image patch similarity (Zhang et al. 2018) per image, averaged over images.
The network is an `optvq_hf.metrics.networks.LPIPSNetwork` given as an object or loaded from a local folder / Hub
repository (`config.json` + `model.safetensors`); nothing is downloaded unless a Hub id is given."""

_INPUTS = """
Init args:
    network: an `LPIPSNetwork`, or a local folder / Hub id holding one (required).
""" + base.NETWORK_INIT_ARGS + base.IMAGE_PAIR_ARGS + """Returns:
    lpips (`float`): mean per-image LPIPS distance.
    num_samples (`int`): number of images.
"""

_CITATION = """@inproceedings{zhang2018lpips, title={The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric}, author={Zhang, Richard and Isola, Phillip and Efros, Alexei A and Shechtman, Eli and Wang, Oliver},
booktitle={CVPR}, year={2018}}"""


class Lpips(base.NetworkImageMetric):
    statistics_features = {"lpips": datasets.Value("float64")}
    description, inputs_description, citation = _DESCRIPTION, _INPUTS, _CITATION

    def __init__(self, network=None, **kwargs):
        if network is None:
            raise ValueError("LPIPS needs `network=`: an LPIPSNetwork, or a local folder or Hub id holding one.")
        if isinstance(network, str):
            network = networks.LPIPSNetwork.from_pretrained(network)
        if not isinstance(network, torch.nn.Module):
            raise ValueError(f"`network` must be an LPIPSNetwork, a folder or a Hub id, got {type(network).__name__}.")
        super().__init__(**kwargs)
        self.network = network.to(self.device).eval().requires_grad_(False)

    def image_statistics(self, predictions, references):
        distances = self.in_chunks(lambda x, y: self.network(x * 2 - 1, y * 2 - 1), predictions, references)
        return {"lpips": distances.double().tolist()}

    def _compute(self, lpips):
        return {"lpips": functional.exact_mean(lpips), "num_samples": len(lpips)}
