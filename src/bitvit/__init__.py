"""bitvit: Vision Transformers with ternary and binary weights.

The names below load on first use (PEP 562), so that ``import bitvit`` and the command line's
``--help`` do not wait for torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_HOMES = {
    "load_checkpoint": "checkpoint",
    "Config": "config", "load_config": "config",
    "InferenceLinear": "engine", "compile_model": "engine", "convert_for_inference": "engine",
    "set_engine": "engine",
    "ExportedModel": "export", "ExportError": "export", "export_checkpoint": "export",
    "export_model": "export", "load": "export",
    "VisionTransformer": "model", "ViTConfig": "model",
    "OrtModel": "onnx_runtime", "load_onnx": "onnx_runtime", "to_onnx": "onnx_export",
    "profile_model": "profile",
    "METHODS": "quant", "BitLinear": "quant", "QuantConfig": "quant", "QuantizedLayer": "quant",
    "quantize_": "quant", "quantize_activations": "quant", "quantize_weights": "quant",
    "RunResult": "train", "train": "train",
    "evaluate": "evaluate",
}

__all__ = [*_HOMES, "__version__"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'bitvit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"bitvit.{home}"), name)
    # A submodule named like its function (train, evaluate) would otherwise shadow it once
    # imported: the package attribute is the function.
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


class _Package(types.ModuleType):
    """``bitvit.train`` and ``bitvit.evaluate`` are the functions, as they were when this file
    imported them eagerly, even after their modules (of the same names) are imported: importing
    a submodule sets the package attribute, which here takes the function instead."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _HOMES.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
