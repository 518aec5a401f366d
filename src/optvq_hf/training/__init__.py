"""Reusable pieces of OptVQ training (used by `examples/run_train.py`).

* losses: L1/L2, LPIPS (local file, folder or Hub), hinge PatchGAN with the VQGAN adaptive weight (`OptVQLoss`);
* optimization: the original AdamW parameter groups and OneCycle / transformers schedules;
* codebook initialization by k-means or random encoder features; EMA of the weights;
* data from `datasets`: decode once, tensors in the hot loop, corrupt images skipped and counted; a bundled demo set;
* metrics and pictures: per-image PSNR, code usage, reconstruction grids, usage histograms;
* dead-run detection: the mean-image baseline, the reconstructions' spread across images, a collapse verdict.
"""

from .codebook_init import CODEBOOK_INIT_METHODS, features_to_rows, kmeans, sample_codes, set_codebook
from .data import (
    CachedImageDataset,
    ImagePreprocessor,
    InMemoryImageDataset,
    OnTheFlyImageDataset,
    StreamingImageDataset,
    augment_batch,
    build_demo_dataset,
    cache_preprocessed,
    collate_images,
    decode_image,
    find_image_column,
    load_image_dataset,
    to_pixel_values,
)
from .diagnostics import (
    MIN_CODES_USED,
    MIN_PSNR_GAIN_DB,
    MIN_RECONSTRUCTION_SPREAD,
    CollapseDiagnosis,
    ReconstructionSpread,
    diagnose_collapse,
    mean_image_psnr,
    reconstruction_spread,
)
from .ema import EMAModel
from .losses import (
    LPIPS,
    LPIPS_WEIGHTS_NAME,
    NLayerDiscriminator,
    OptVQLoss,
    OptVQLossOutput,
    adaptive_gan_weight,
    hinge_discriminator_loss,
    vanilla_discriminator_loss,
)
from .metrics import codebook_statistics, per_image_psnr, save_reconstruction_grid, save_usage_histogram
from .optim import SCHEDULERS, build_optimizer, build_param_groups, build_scheduler, split_weight_decay

__all__ = [
    "CODEBOOK_INIT_METHODS", "features_to_rows", "kmeans", "sample_codes", "set_codebook",
    "CachedImageDataset", "ImagePreprocessor", "InMemoryImageDataset", "OnTheFlyImageDataset",
    "StreamingImageDataset", "augment_batch", "build_demo_dataset", "cache_preprocessed", "collate_images",
    "decode_image", "find_image_column", "load_image_dataset", "to_pixel_values",
    "MIN_CODES_USED", "MIN_PSNR_GAIN_DB", "MIN_RECONSTRUCTION_SPREAD", "CollapseDiagnosis", "ReconstructionSpread",
    "diagnose_collapse", "mean_image_psnr", "reconstruction_spread",
    "EMAModel",
    "LPIPS", "LPIPS_WEIGHTS_NAME", "NLayerDiscriminator", "OptVQLoss", "OptVQLossOutput", "adaptive_gan_weight",
    "hinge_discriminator_loss", "vanilla_discriminator_loss",
    "codebook_statistics", "per_image_psnr", "save_reconstruction_grid", "save_usage_histogram",
    "SCHEDULERS", "build_optimizer", "build_param_groups", "build_scheduler", "split_weight_decay",
]
