"""bitvit: Vision Transformers with ternary and binary weights."""

from bitvit.model import VisionTransformer, ViTConfig
from bitvit.quant import (
    METHODS,
    BitLinear,
    QuantConfig,
    QuantizedLayer,
    quantize_,
    quantize_activations,
    quantize_weights,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "BitLinear",
    "QuantConfig",
    "QuantizedLayer",
    "ViTConfig",
    "VisionTransformer",
    "__version__",
    "quantize_",
    "quantize_activations",
    "quantize_weights",
]
