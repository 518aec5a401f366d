"""Model cards for OptVQ checkpoints (written by `save_pretrained` and `push_to_hub`)."""

from __future__ import annotations

from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .metrics.functional import describe_convention
from .quantization import get_quantizer_class

PAPER_URL = "https://arxiv.org/abs/2412.15195"
PAPER_TITLE = "Preventing Local Pitfalls in Vector Quantization via Optimal Transport"
BASE_TAGS = ["optvq", "vector-quantization", "image-tokenizer", "optimal-transport", "arxiv:2412.15195"]

_TEMPLATE = """---
{card_data}
---

# {title}

An **OptVQ** image tokenizer ([{paper_title}]({paper_url})): a {architecture_text} autoencoder whose latents are
quantized by {quantizer_text}. It turns an image into a grid of discrete tokens for autoregressive or diffusion
models, and turns tokens back into pixels.

## Architecture

| | |
|---|---|
| backbone | {architecture_text} |
| input | {in_channels}-channel images in [-1, 1], height and width divisible by {factor} (trained at {resolution}x{resolution}) |
| latent grid | `H/{factor} x W/{factor}`, {embed_dim} channels, {latent_channels} before `quant_conv` |
| tokens per position | {num_heads} (multi-head: head k quantizes channels `[k*{code_dim}, (k+1)*{code_dim})`) |
| tokens for a {resolution}x{resolution} image | {tokens_per_image} |
| parameters | {num_parameters} |

## Codebook

{codebook_size} codes of dimension {code_dim}{projection_text}, shared by all heads. Training assignment:
{training_assignment}; inference assignment: `{inference_assignment}`{inference_note}.

{source_text}{training_text}{results_text}## Usage

```python
import torch
from optvq_hf import OptVQImageProcessor, OptVQModel

model = OptVQModel.from_pretrained("{repo_id}").eval()
processor = OptVQImageProcessor.from_pretrained("{repo_id}")

pixel_values = processor(images, return_tensors="pt").pixel_values   # images: PIL images or arrays
with torch.no_grad():
    token_ids = model.encode(pixel_values).token_ids                 # (B, {num_heads}, h, w)
    reconstruction = model.decode_tokens(token_ids)                  # (B, {out_channels}, H, W) in [-1, 1]
images_out = processor.postprocess(reconstruction, output_type="pil")
```

## License

{license_text}

## Citation

```bibtex
@article{{zhang2024optvq,
  title={{{paper_title}}},
  author={{Zhang, Borui and Zheng, Wenzhao and Zhou, Jie and Lu, Jiwen}},
  journal={{arXiv preprint arXiv:2412.15195}},
  year={{2024}}
}}
```
"""


#: The metrics whose value depends on the score convention.
CONVENTION_METRICS = ("psnr", "ssim")


def convention_note(results, score_convention: str) -> str:
    """The card's sentence on how PSNR / SSIM were scored (empty when `results` has neither)."""
    if not any(name in results for name in CONVENTION_METRICS):
        return ""
    return f"PSNR and SSIM (`{score_convention}` convention): {describe_convention(score_convention)}.\n\n"


def build_model_card(
    config,
    repo_id: str | None = None,
    num_parameters: int | None = None,
    source_checkpoint: str | None = None,
    training_summary: str | None = None,
    eval_results: dict[str, float] | None = None,
    dataset_name: str | None = None,
    license: str = "mit",
    tags: list[str] | None = None,
    score_convention: str = "rgb",
) -> ModelCard:
    """A full model card for an OptVQ model: description, architecture, codebook, usage, license, paper.

    Args:
        config ([`OptVQConfig`]): the model's configuration.
        repo_id (`str`, *optional*): where the model lives (used in the usage snippet).
        num_parameters (`int`, *optional*): number of parameters to report.
        source_checkpoint (`str`, *optional*): the original checkpoint this one was converted from.
        training_summary (`str`, *optional*): Markdown describing the training data and recipe.
        eval_results (`dict[str, float]`, *optional*): metric name -> value (e.g. `{"psnr": 26.6}`), written to
            the card and to its `model-index` metadata.
        dataset_name (`str`, *optional*): the dataset the results (and training) refer to.
        license (`str`, defaults to `"mit"`): license id of the weights (the original release is MIT).
        tags (`list[str]`, *optional*): extra tags.
        score_convention (`str`, defaults to `"rgb"`): how the PSNR / SSIM in `eval_results` were scored (`"rgb"`
            or `"paper"`, see `optvq_hf.metrics.functional`); stated in the card and as the results' `metric_config`.
    """
    repo_id = repo_id or "path/to/optvq-model"
    factor = config.downsample_factor
    grid = config.resolution // factor
    architecture_text = (
        "VQGAN (taming-transformers)" if config.architecture == "vqgan" else "small CNN (the paper's Table 4, f = 4)"
    )
    quantizer_class = get_quantizer_class(config.quantizer_type)
    quantizer_text, training_assignment = quantizer_class.describe(config)
    inference_assignment = quantizer_class.resolved_inference_assignment(config)
    inference_note = (
        " (batch-independent, deterministic tokens)"
        if inference_assignment == "nearest"
        else " (the original code's behaviour: tokens depend on the other images of the batch)"
    )
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="image-to-image",
        tags=BASE_TAGS + [config.quantizer_type] + list(tags or []),
        datasets=[dataset_name] if dataset_name else None,
    )
    if eval_results:
        from huggingface_hub import EvalResult

        card_data.eval_results = [
            EvalResult(
                task_type="image-to-image",
                task_name="Image reconstruction",
                dataset_type=dataset_name or "custom",
                dataset_name=dataset_name or "custom",
                metric_type=name,
                metric_name=name,
                metric_value=float(value),
                metric_config=score_convention if name in CONVENTION_METRICS else None,
            )
            for name, value in eval_results.items()
        ]
        card_data.model_name = repo_id
    results_text = ""
    if eval_results:
        rows = "\n".join(f"| {name} | {value:.4g} |" for name, value in eval_results.items())
        results_text = (f"## Results\n\nOn {dataset_name or 'the evaluation set'}:\n\n| metric | value |\n|---|---|\n{rows}\n\n"
                        + convention_note(eval_results, score_convention))
    content = _TEMPLATE.format(
        card_data=card_data.to_yaml(),
        title=repo_id.split("/")[-1],
        paper_title=PAPER_TITLE,
        paper_url=PAPER_URL,
        architecture_text=architecture_text,
        quantizer_text=quantizer_text,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        factor=factor,
        resolution=config.resolution,
        embed_dim=config.embed_dim,
        latent_channels=config.latent_channels,
        num_heads=config.num_heads,
        code_dim=config.code_dim,
        tokens_per_image=f"{grid}x{grid}x{config.num_heads} = {grid * grid * config.num_heads}",
        num_parameters=f"{num_parameters:,}" if num_parameters else "see `model.num_parameters()`",
        codebook_size=config.codebook_size,
        projection_text=" (the codes in use are a shared affine projection of a learned table)"
        if config.use_codebook_projection
        else "",
        training_assignment=training_assignment,
        inference_assignment=inference_assignment,
        inference_note=inference_note,
        source_text=f"## Source\n\nConverted from the original checkpoint `{source_checkpoint}`.\n\n" if source_checkpoint else "",
        training_text=f"## Training\n\n{training_summary.strip()}\n\n" if training_summary else "",
        results_text=results_text,
        repo_id=repo_id,
        license_text=f"`{license}`" + (" (the original OptVQ release is MIT-licensed)." if license == "mit" else "."),
    )
    return ModelCard(content)


def card_kwargs_from(model: Any) -> dict[str, Any]:
    """Default `build_model_card` arguments for a model instance."""
    return {"num_parameters": model.num_parameters()}
