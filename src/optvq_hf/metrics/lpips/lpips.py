"""LPIPS of image reconstructions, an `evaluate` metric shipped with optvq-hf (loadable offline by path)."""

import datasets
import torch

from optvq_hf.metrics import base, networks

_DESCRIPTION = """Learned perceptual image patch similarity (Zhang et al. 2018) per image, averaged over images.
The network is an `optvq_hf.metrics.networks.LPIPSNetwork` given as an object or loaded from a local folder / Hub
repository (`config.json` + `model.safetensors`); nothing is downloaded unless a Hub id is given."""

_INPUTS = """
Init args:
    network: an `LPIPSNetwork`, or a local folder / Hub id holding one (required).
    device: where the network runs (default "cpu").
    batch_size: images per network call inside `add_batch` (default 64).
Args:
    predictions: reconstructions, `(B, C, H, W)` or `(B, H, W)`, floats in `input_range` (default [-1, 1]) or uint8.
    references: originals, same shape.
Returns:
    lpips (`float`): mean per-image LPIPS distance.
    num_samples (`int`): number of images.
"""

_CITATION = """@inproceedings{zhang2018lpips, title={The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric}, author={Zhang, Richard and Isola, Phillip and Efros, Alexei A and Shechtman, Eli and Wang, Oliver},
booktitle={CVPR}, year={2018}}"""


class Lpips(base.PerImageMetric):
    statistics_features = {"lpips": datasets.Value("float64")}
    description = _DESCRIPTION
    inputs_description = _INPUTS
    citation = _CITATION

    def __init__(self, network=None, device="cpu", batch_size: int = 64, **kwargs):
        if network is None:
            raise ValueError("LPIPS needs `network=`: an LPIPSNetwork, or a local folder or Hub id holding one.")
        if isinstance(network, str):
            network = networks.LPIPSNetwork.from_pretrained(network)
        if not isinstance(network, torch.nn.Module):
            raise ValueError(f"`network` must be an LPIPSNetwork, a folder or a Hub id, got {type(network).__name__}.")
        self.network = network.to(device).eval().requires_grad_(False)
        self.device = device
        self.batch_size = int(batch_size)
        super().__init__(**kwargs)

    @torch.no_grad()
    def image_statistics(self, predictions, references):
        distances = []
        for start in range(0, predictions.shape[0], self.batch_size):
            x = predictions[start:start + self.batch_size].float().to(self.device) * 2 - 1
            y = references[start:start + self.batch_size].float().to(self.device) * 2 - 1
            distances.append(self.network(x, y).double().cpu())
        return {"lpips": torch.cat(distances).tolist()}

    def _compute(self, lpips):
        from optvq_hf.metrics.functional import exact_mean

        return {"lpips": exact_mean(lpips), "num_samples": len(lpips)}
