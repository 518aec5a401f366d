"""Reusable pieces of OptVQ training (used by `examples/run_train.py`; see docs/training.md).

* losses: L1/L2, LPIPS (local file, folder or Hub), hinge PatchGAN with the VQGAN adaptive weight (`OptVQLoss`),
  and the dict of terms to log (`OptVQLoss.log_terms`, averaged over steps and processes by `RunningMeans`);
* optimization: the original AdamW parameter groups and OneCycle / transformers schedules;
* codebook initialization by k-means or random encoder features, gathered over processes (`initialize_codebook`);
  EMA of the weights;
* data from `datasets` (also used by `examples/run_eval.py`): one loader for Hub ids, folders, files and streams,
  decode once, tensors in the hot loop, corrupt images skipped and counted; a bundled demo set;
* evaluation during training (`evaluate_reconstruction`), with the metrics and pictures of `optvq_hf.metrics`;
* checkpoints saved and resumed atomically; CPU threads per process; a fresh process for other Accelerate settings.
* dead-run detection: the mean-image baseline, the reconstructions' spread across images, a collapse verdict; and
  divergence detection on every step (non-finite loss, exploding latents), agreed on by every process.
"""

from .checkpointing import (
    checkpoint_step,
    list_checkpoints,
    resolve_resume_checkpoint,
    save_checkpoint,
    save_final_model,
    swap_in_folder,
)
from .codebook_init import (
    CODEBOOK_INIT_METHODS,
    features_to_rows,
    initialize_codebook,
    kmeans,
    sample_codes,
    set_codebook,
)
from .data import (
    CachedImageDataset,
    ImagePreprocessor,
    InMemoryImageDataset,
    OnTheFlyImageDataset,
    StreamingImageDataset,
    augment_batch,
    augmentation_generator,
    build_demo_dataset,
    build_image_dataset,
    cache_preprocessed,
    collate_images,
    decode_image,
    decode_image_column,
    decode_images,
    find_image_column,
    iter_image_batches,
    load_image_dataset,
    split_train_and_eval,
    to_pixel_values,
)
from .diagnostics import (
    MAX_LATENT_CODEBOOK_RATIO,
    MAX_TRAINING_LATENT_MAGNITUDE,
    MIN_CODES_USED,
    MIN_PSNR_GAIN_DB,
    MIN_RECONSTRUCTION_SPREAD,
    CollapseDiagnosis,
    DivergenceDiagnosis,
    ReconstructionSpread,
    diagnose_collapse,
    diagnose_divergence,
    divergence_signal,
    mean_image_psnr,
    reconstruction_spread,
    reduce_divergence_signal,
)
from .ema import EMAModel
from .evaluation import RunningMeans, evaluate_reconstruction
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
from .runtime import (
    accelerate_state_conflicts, distributed_state, run_in_fresh_process, set_cpu_threads, several_processes_on_cpu,
)

__all__ = [
    "checkpoint_step", "list_checkpoints", "resolve_resume_checkpoint", "save_checkpoint", "save_final_model",
    "swap_in_folder", "CODEBOOK_INIT_METHODS", "features_to_rows", "initialize_codebook", "kmeans", "sample_codes", "set_codebook",
    "CachedImageDataset", "ImagePreprocessor", "InMemoryImageDataset", "OnTheFlyImageDataset",
    "StreamingImageDataset", "augment_batch", "build_demo_dataset", "cache_preprocessed", "collate_images",
    "decode_image", "find_image_column", "load_image_dataset", "to_pixel_values", "augmentation_generator",
    "build_image_dataset", "decode_image_column", "decode_images", "iter_image_batches", "split_train_and_eval",
    "MIN_CODES_USED", "MIN_PSNR_GAIN_DB", "MIN_RECONSTRUCTION_SPREAD", "CollapseDiagnosis", "ReconstructionSpread",
    "diagnose_collapse", "mean_image_psnr", "reconstruction_spread", "MAX_TRAINING_LATENT_MAGNITUDE",
    "MAX_LATENT_CODEBOOK_RATIO",
    "DivergenceDiagnosis", "diagnose_divergence", "divergence_signal", "reduce_divergence_signal",
    "EMAModel", "RunningMeans", "evaluate_reconstruction",
    "LPIPS", "LPIPS_WEIGHTS_NAME", "NLayerDiscriminator", "OptVQLoss", "OptVQLossOutput", "adaptive_gan_weight",
    "hinge_discriminator_loss", "vanilla_discriminator_loss",
    "codebook_statistics", "per_image_psnr", "save_reconstruction_grid", "save_usage_histogram",
    "SCHEDULERS", "build_optimizer", "build_param_groups", "build_scheduler", "split_weight_decay",
    "accelerate_state_conflicts", "distributed_state", "run_in_fresh_process", "set_cpu_threads",
    "several_processes_on_cpu",
]
