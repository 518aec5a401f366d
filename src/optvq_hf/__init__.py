"""optvq-hf: the OptVQ image tokenizer for transformers, diffusers and the Hub.

Importing the package registers `OptVQConfig`, `OptVQModel` and `OptVQImageProcessor` with transformers'
`AutoConfig`, `AutoModel` and `AutoImageProcessor`.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_optvq import OptVQConfig
from .image_processing_optvq import OptVQImageProcessor
from .modeling_optvq import OptVQEncoderOutput, OptVQModel, OptVQModelOutput, OptVQPreTrainedModel
from .latent_scaling import compute_scaling_factor
from .otvae import OTVAEQuantizer
from .quantization import (
    CodebookQuantizer,
    OptVQQuantizer,
    QuantizerOutput,
    VectorQuantizer,
    available_quantizer_types,
    build_quantizer,
    get_quantizer_class,
    nearest_assign,
    register_quantizer,
)
from .sinkhorn import sinkhorn_assign, sinkhorn_plan

__version__ = "0.1.0"

AutoConfig.register(OptVQConfig.model_type, OptVQConfig, exist_ok=True)
AutoModel.register(OptVQConfig, OptVQModel, exist_ok=True)
AutoImageProcessor.register(OptVQConfig, slow_image_processor_class=OptVQImageProcessor, exist_ok=True)

__all__ = [
    "OptVQConfig",
    "OptVQModel",
    "OptVQPreTrainedModel",
    "OptVQModelOutput",
    "OptVQEncoderOutput",
    "OptVQImageProcessor",
    "CodebookQuantizer",
    "OptVQQuantizer",
    "VectorQuantizer",
    "OTVAEQuantizer",
    "QuantizerOutput",
    "register_quantizer",
    "get_quantizer_class",
    "available_quantizer_types",
    "build_quantizer",
    "nearest_assign",
    "sinkhorn_assign",
    "sinkhorn_plan",
    "compute_scaling_factor",
    "__version__",
]

# OptVQ as an LM tokenizer: token grid <-> sequence layout and the images <-> sequences processor.
from .processing_optvq import OptVQProcessor  # noqa: E402
from .sequence import ImageSequenceLayout  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

AutoProcessor.register(OptVQConfig, OptVQProcessor, exist_ok=True)
__all__ += ["OptVQProcessor", "ImageSequenceLayout"]

# diffusers is optional (extra `optvq-hf[diffusers]`): `OptVQVQModel` is imported on first access, so
# `import optvq_hf` works without diffusers.
_DIFFUSERS_EXPORTS = ("OptVQVQModel", "OptVQDiffusersQuantizer")


def __getattr__(name):
    if name in _DIFFUSERS_EXPORTS:
        from . import diffusers_vq

        return getattr(diffusers_vq, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __import__("importlib.util").util.find_spec("diffusers") is not None:  # keep `import *` working without it
    __all__ += list(_DIFFUSERS_EXPORTS)
