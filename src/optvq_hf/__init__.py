"""optvq-hf: the OptVQ image tokenizer for transformers, diffusers and the Hub.

Importing the package registers `OptVQConfig`, `OptVQModel` and `OptVQImageProcessor` with transformers'
`AutoConfig`, `AutoModel` and `AutoImageProcessor`.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_optvq import OptVQConfig
from .image_processing_optvq import OptVQImageProcessor
from .modeling_optvq import OptVQEncoderOutput, OptVQModel, OptVQModelOutput, OptVQPreTrainedModel
from .quantization import OptVQQuantizer, QuantizerOutput, VectorQuantizer, build_quantizer, nearest_assign
from .sinkhorn import sinkhorn_assign

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
    "OptVQQuantizer",
    "VectorQuantizer",
    "QuantizerOutput",
    "build_quantizer",
    "nearest_assign",
    "sinkhorn_assign",
    "__version__",
]

# OptVQ as an LM tokenizer: token grid <-> sequence layout and the images <-> sequences processor.
from .processing_optvq import OptVQProcessor  # noqa: E402
from .sequence import ImageSequenceLayout  # noqa: E402

__all__ += ["OptVQProcessor", "ImageSequenceLayout"]
