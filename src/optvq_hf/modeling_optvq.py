"""OptVQ as a transformers model: encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch
from huggingface_hub import HfApi, ModelCard
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput, logging

from .autoencoder import OptVQAutoencoderMixin
from .backbones import OptVQAttnBlock, OptVQResnetBlock
from .configuration_optvq import OptVQConfig
from .model_card import build_model_card
from .quantization import CodebookQuantizer, QuantizerOutput
from .validation import check_weights_fit, weights_file_errors_named

logger = logging.get_logger(__name__)


@dataclass
class OptVQEncoderOutput(ModelOutput):
    """Output of [`OptVQModel.encode`].

    Args:
        latents (`torch.FloatTensor` of shape `(B, embed_dim, h, w)`):
            Encoder features after `quant_conv`, before quantization.
        quantized (`torch.FloatTensor` of shape `(B, embed_dim, h, w)`):
            Quantized latents (straight-through gradients to `latents`).
        token_ids (`torch.LongTensor` of shape `(B, num_heads, h, w)`):
            Code index of every head at every position.
        quantization_loss (`torch.FloatTensor` of shape `()`):
            Commitment + codebook loss of the quantizer.
        perplexity (`torch.FloatTensor` of shape `()`):
            Perplexity of this batch's code histogram.
        codebook_usage (`torch.FloatTensor` of shape `()`):
            Fraction of codes used by this batch.
        code_counts (`torch.FloatTensor` of shape `(B, codebook_size)`):
            How often each code was chosen in each image (`code_counts.sum(0)`: the batch's histogram). Every
            field with a batch axis is per sample, so outputs can be split by sample (Trainer's prediction loop).
    """

    latents: torch.FloatTensor | None = None
    quantized: torch.FloatTensor | None = None
    token_ids: torch.LongTensor | None = None
    quantization_loss: torch.FloatTensor | None = None
    perplexity: torch.FloatTensor | None = None
    codebook_usage: torch.FloatTensor | None = None
    code_counts: torch.FloatTensor | None = None


@dataclass
class OptVQModelOutput(ModelOutput):
    """Output of [`OptVQModel.forward`]: the reconstruction and every field of [`OptVQEncoderOutput`].

    Args:
        reconstruction (`torch.FloatTensor` of shape `(B, out_channels, H, W)`):
            Decoded image, nominally in [-1, 1] (not clamped).
        token_ids, quantization_loss, latents, quantized, perplexity, codebook_usage, code_counts:
            As in [`OptVQEncoderOutput`].
    """

    reconstruction: torch.FloatTensor | None = None
    token_ids: torch.LongTensor | None = None
    quantization_loss: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    quantized: torch.FloatTensor | None = None
    perplexity: torch.FloatTensor | None = None
    codebook_usage: torch.FloatTensor | None = None
    code_counts: torch.FloatTensor | None = None


def _quantizer_fields(output: QuantizerOutput) -> dict:
    """The model-output fields of a [`QuantizerOutput`]; `code_counts` per image `(B, codebook_size)`."""
    token_ids = output.token_ids.flatten(1)
    code_counts = torch.zeros(token_ids.shape[0], output.code_counts.shape[0], device=token_ids.device)
    code_counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=code_counts.dtype))
    return dict(quantized=output.quantized, token_ids=output.token_ids, quantization_loss=output.loss,
                perplexity=output.perplexity, codebook_usage=output.codebook_usage, code_counts=code_counts)


class OptVQPreTrainedModel(PreTrainedModel):
    """Weight initialization and the transformers plumbing shared by OptVQ models."""

    config_class = OptVQConfig
    base_model_prefix = "optvq"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["OptVQResnetBlock", "OptVQAttnBlock", "OptVQQuantizer"]  # per instance: its quantizer's class
    _keep_in_fp32_modules_strict = ["quantizer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        # Every parameter is one of these cases (tests/test_conformance.py drops each one from a checkpoint in turn).
        # The quantizer's table and projection get the quantizer's own initialization (table ~ N(0, 1), projection ~
        # N(0, 1/d)) whichever of its modules transformers visits: it skips a module without direct parameters, like
        # the quantizer itself. Under transformers' loading, the init functions leave loaded parameters alone.
        # Convolutions and norms: PyTorch's defaults (the small CNN's convolutions define their own), as the original.
        quantizer = getattr(self, "quantizer", None)
        if isinstance(quantizer, CodebookQuantizer) and any(module is part for part in quantizer.modules()):
            quantizer.reset_parameters()
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            module.reset_parameters()
        elif isinstance(module, nn.GroupNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class OptVQModel(OptVQAutoencoderMixin, OptVQPreTrainedModel):
    r"""
    OptVQ image tokenizer: a VQGAN-style (or small CNN) autoencoder whose latents are quantized by optimal-transport
    (Sinkhorn) assignment during training and by nearest-neighbour (or Sinkhorn) assignment at inference. The network
    and its steps are the shared core ([`~optvq_hf.autoencoder.OptVQAutoencoderMixin`]; `encode_latents`,
    `check_pixel_values`, ... come from it); this class adds the transformers API.

    Pixels are `(B, C, H, W)` in [-1, 1]; `H` and `W` must be divisible by `config.downsample_factor`.

    Example:

    ```python
    >>> import torch
    >>> from optvq_hf import OptVQConfig, OptVQModel
    >>> model = OptVQModel(OptVQConfig.from_preset("optvq-mnist")).eval()
    >>> pixels = torch.rand(2, 1, 32, 32) * 2 - 1
    >>> encoded = model.encode(pixels)
    >>> encoded.token_ids.shape
    torch.Size([2, 4, 8, 8])
    >>> model.decode_tokens(encoded.token_ids).shape
    torch.Size([2, 1, 32, 32])
    ```
    """

    def __init__(self, config: OptVQConfig):
        super().__init__(config)
        self._build_autoencoder(config)
        self.post_init()

    @property
    def optvq_config(self) -> OptVQConfig:
        return self.config

    # ----------------------------------------------------------------------------------------------------------
    # Public API: each method checks its input once, then runs the core's steps
    # ----------------------------------------------------------------------------------------------------------
    def quantize(self, latents: torch.Tensor):
        """Quantize latents `(B, embed_dim, h, w)`; returns the quantizer's [`QuantizerOutput`]."""
        self.check_latents(latents, "latents", quantize=True)
        return self.quantize_latents(latents)

    def encode(self, pixel_values: torch.Tensor, return_dict: bool = True) -> OptVQEncoderOutput:
        """Encode and quantize images.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, in_channels, H, W)`): images in [-1, 1].
            return_dict (`bool`, defaults to `True`): return an [`OptVQEncoderOutput`] rather than a tuple.
        """
        latents = self.encode_latents(pixel_values)
        quantized = self.quantize_latents(latents)
        output = OptVQEncoderOutput(latents=latents, **_quantizer_fields(quantized))
        return output if return_dict else output.to_tuple()

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        """Decode quantized latents `(B, embed_dim, h, w)` to pixels `(B, out_channels, h*f, w*f)`."""
        self.check_latents(quantized, "quantized")
        return self.decode_latents(quantized)

    def decode_tokens(self, token_ids: torch.LongTensor) -> torch.Tensor:
        """Decode token ids `(B, num_heads, h, w)` (or `(B, h, w)` when `num_heads == 1`) to pixels."""
        return self.decode_latents(self.embed_token_ids(token_ids))

    @torch.no_grad()
    def get_codebook(self) -> torch.Tensor:
        """The codebook in use (after the shared projection), `(codebook_size, embed_dim // num_heads)`, float32."""
        return self.quantizer.codebook.detach()

    def tokens_to_sequence(self, token_ids: torch.LongTensor, offset: int = 0, **layout_kwargs) -> torch.LongTensor:
        """Flatten token ids `(B, num_heads, h, w)` into LM sequences `(B, h * w * num_heads)`: raster order, heads
        innermost, id = `offset + code`. See `optvq_hf.sequence.ImageSequenceLayout`.

        Args:
            token_ids (`torch.LongTensor`): `(B, num_heads, h, w)` (or `(B, h, w)` when `num_heads == 1`).
            offset (`int`, defaults to 0): id of code 0 in the LM vocabulary.
            layout_kwargs: other `ImageSequenceLayout` fields (`boi_token_id`, `eoi_token_id`, `head_vocabulary`,
                `factorized`).
        """
        from .sequence import ImageSequenceLayout

        return ImageSequenceLayout.from_config(self.config, offset=offset, **layout_kwargs).tokens_to_sequence(token_ids)

    def sequence_to_tokens(self, sequence: torch.LongTensor, grid_size, offset: int = 0,
                           **layout_kwargs) -> torch.LongTensor:
        """Inverse of [`~OptVQModel.tokens_to_sequence`] (exact): `(B, L)` -> token ids `(B, num_heads, h, w)`.

        Args:
            sequence (`torch.LongTensor`): `(B, L)` as produced by `tokens_to_sequence` with the same arguments.
            grid_size (`tuple[int, int]`): the latent grid `(h, w)` (image size // `config.downsample_factor`).
            offset (`int`, defaults to 0): id of code 0 in the LM vocabulary.
            layout_kwargs: other `ImageSequenceLayout` fields, as given to `tokens_to_sequence`.
        """
        from .sequence import ImageSequenceLayout

        layout = ImageSequenceLayout.from_config(self.config, offset=offset, **layout_kwargs)
        return layout.sequence_to_tokens(sequence, grid_size).to(self.device)

    def get_last_layer_weight(self) -> torch.Tensor:
        """Weight of the decoder's last convolution (for the VQGAN adaptive GAN weight)."""
        return self.decoder.last_layer_weight

    def forward(self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs) -> OptVQModelOutput:
        """Encode, quantize and decode images.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, in_channels, H, W)`): images in [-1, 1].
            return_dict (`bool`, *optional*): return an [`OptVQModelOutput`] (default) rather than a tuple.
        """
        latents = self.encode_latents(pixel_values)
        quantized = self.quantize_latents(latents)
        output = OptVQModelOutput(
            reconstruction=self.decode_latents(quantized.quantized), latents=latents, **_quantizer_fields(quantized)
        )
        return_dict = True if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    # ----------------------------------------------------------------------------------------------------------
    # Loading: native folders through transformers, diffusers and original-release folders too
    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load a model saved by `save_pretrained`, by the diffusers front end (`OptVQVQModel.save_pretrained`) or,
        converting on the fly, one in the original release's layout.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a Hub id or a local folder (with `subfolder=`,
                e.g. a pipeline's `vqvae`). Original-layout repositories (`BorelTHU/optvq-16x16x4`: nested
                `encoder`/`decoder`/`quantize` config, `model.`-prefixed keys) are detected and converted (this is
                logged); diffusers-layout `OptVQVQModel` folders (`diffusion_pytorch_model.safetensors`) load as is.
            initialize_missing_weights (`bool`, *optional*, defaults to `False`): initialize weights the checkpoint
                lacks. By default a checkpoint missing any weight raises a `ValueError` naming them.
            ignore_mismatched_sizes (`bool`, *optional*, defaults to `False`): initialize weights whose shape in the
                checkpoint differs from the config's. By default they raise a `ValueError` listing both shapes.
            kwargs: the usual transformers loading arguments (`dtype`, `device_map`, `revision`, `cache_dir`,
                `token`, `local_files_only`, `output_loading_info`, config overrides, ...).

        A folder whose `config.json` names another model type (or is not UTF-8 JSON) raises a `ValueError`.
        """
        from .convert_original import (
            is_diffusers_config,
            is_original_config,
            load_diffusers_model,
            load_original_model,
            read_config_dict,
        )

        config_dict = read_config_dict(pretrained_model_name_or_path, kwargs)  # raises if unreadable
        if is_original_config(config_dict):
            return load_original_model(cls, pretrained_model_name_or_path, config_dict, **kwargs)
        if is_diffusers_config(config_dict):
            return load_diffusers_model(cls, pretrained_model_name_or_path, config_dict, **kwargs)
        found_type = (config_dict or {}).get("model_type")
        if config_dict is not None and found_type is None and "_class_name" in config_dict:
            raise ValueError(f"{pretrained_model_name_or_path} holds a diffusers {config_dict['_class_name']}, not an "
                             f"OptVQ model.")
        if config_dict is not None and found_type != cls.config_class.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a model of type {found_type!r}, not an OptVQ model (model_type "
                f"{cls.config_class.model_type!r}, or the original release's layout)."
            )
        allow_missing = bool(kwargs.pop("initialize_missing_weights", False))
        allow_mismatched = bool(kwargs.pop("ignore_mismatched_sizes", False))
        output_loading_info = bool(kwargs.pop("output_loading_info", False))
        # Mismatched weights are reported here (listed with both shapes, at any verbosity), not by transformers.
        with weights_file_errors_named(str(pretrained_model_name_or_path)):
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, ignore_mismatched_sizes=True,
                **kwargs
            )
        check_weights_fit(str(pretrained_model_name_or_path), missing=loading_info["missing_keys"],
                          mismatched=loading_info["mismatched_keys"], unexpected=loading_info["unexpected_keys"],
                          allow_missing=allow_missing, allow_mismatched=allow_mismatched)
        return (model, loading_info) if output_loading_info else model

    def save_pretrained(self, save_directory, *args, model_card: bool | ModelCard = True,
                        source_checkpoint: str | None = None, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus a model card (`README.md`).

        Args:
            save_directory (`str` or `os.PathLike`): where to write.
            model_card (`bool` or `huggingface_hub.ModelCard`, defaults to `True`): `True` writes a generated card
                unless the folder already has a `README.md`; a `ModelCard` is written as given; `False` writes none.
            source_checkpoint (`str`, *optional*): recorded in the card when this model was converted.
            args, kwargs: passed to `PreTrainedModel.save_pretrained`.
        """
        super().save_pretrained(save_directory, *args, **kwargs)
        readme = os.path.join(save_directory, "README.md")
        if isinstance(model_card, ModelCard):
            model_card.save(readme)
        elif model_card and not os.path.exists(readme):
            build_model_card(
                self.config, repo_id=os.path.basename(os.path.abspath(save_directory)),
                num_parameters=self.num_parameters(), source_checkpoint=source_checkpoint,
            ).save(readme)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, revision: str | None = None, create_pr: bool = False,
                    model_card: ModelCard | None = None, tags: list[str] | None = None, **save_kwargs):
        """Upload weights, config and a full model card (not the transformers stub) to the Hub.

        Args:
            repo_id (`str`): target repository, created if needed.
            commit_message (`str`, *optional*): commit message.
            private (`bool`, *optional*): visibility of a newly created repository.
            token (`str`, *optional*): Hub token.
            revision (`str`, *optional*): branch to push to.
            create_pr (`bool`, defaults to `False`): open a pull request instead of committing.
            model_card (`huggingface_hub.ModelCard`, *optional*): card to upload; generated when omitted.
            tags (`list[str]`, *optional*): extra tags for the generated card.
            save_kwargs: passed to `save_pretrained` (e.g. `max_shard_size`).
        """
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        card = model_card or build_model_card(self.config, repo_id=repo_id, num_parameters=self.num_parameters(),
                                              tags=tags)
        with tempfile.TemporaryDirectory() as work_dir:
            self.save_pretrained(work_dir, model_card=card, **save_kwargs)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=work_dir,
                commit_message=commit_message or "Upload OptVQ model",
                revision=revision,
                create_pr=create_pr,
            )


__all__ = ["OptVQPreTrainedModel", "OptVQModel", "OptVQModelOutput", "OptVQEncoderOutput", "OptVQResnetBlock",
           "OptVQAttnBlock"]
