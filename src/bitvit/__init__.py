"""bitvit: Vision Transformers with ternary and binary weights."""

from bitvit.checkpoint import load_checkpoint
from bitvit.config import Config, load_config
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
from bitvit.train import RunResult, evaluate, train

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Config",
    "RunResult",
    "evaluate",
    "load_checkpoint",
    "load_config",
    "train",
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
