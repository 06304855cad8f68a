"""bitvit: Vision Transformers with ternary and binary weights."""

from bitvit.checkpoint import load_checkpoint
from bitvit.config import Config, load_config
from bitvit.engine import InferenceLinear, compile_model, convert_for_inference, set_engine
from bitvit.export import ExportedModel, ExportError, export_checkpoint, export_model, load
from bitvit.model import VisionTransformer, ViTConfig
from bitvit.profile import profile_model
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
    "ExportError",
    "ExportedModel",
    "export_checkpoint",
    "export_model",
    "load",
    "load_checkpoint",
    "load_config",
    "train",
    "InferenceLinear",
    "compile_model",
    "convert_for_inference",
    "set_engine",
    "profile_model",
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
