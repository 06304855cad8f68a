"""bitvit: Vision Transformers with ternary and binary weights.

The package is cut by job, each layer importing only those below it (tests/test_layout.py):

- `bitvit.files`: atomic writes and the cache folder (layer 0);
- `bitvit.nn`: methods table, quantizers, kernels, BitLinear, the ViT; `bitvit.data` (layer 1);
- `bitvit.training`: config, loop, losses, checkpoints, run folder (layer 2);
- `bitvit.deploy`: export, engines, ONNX, evaluate, profile; `bitvit.studies`: sweeps,
  statistics, reports (layer 3);
- `bitvit.cli`: the command line (layer 4).

The names below load on first use (PEP 562), so that ``import bitvit`` and the command line's
``--help`` do not wait for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_HOMES = {
    "VisionTransformer": "nn.model", "ViTConfig": "nn.model",
    "METHODS": "nn.quant", "BitLinear": "nn.quant", "QuantConfig": "nn.quant",
    "QuantizedLayer": "nn.quant", "quantize_": "nn.quant", "quantize_activations": "nn.quant",
    "quantize_weights": "nn.quant",
    "ImageSet": "data", "load_data": "data",
    "Config": "training.config", "load_config": "training.config",
    "load_checkpoint": "training.checkpoint", "load_pretrained": "training.pretrained",
    "RunResult": "training.loop", "train": "training.loop",
    "evaluate": "deploy.evaluate",
    "ExportedModel": "deploy.export", "ExportError": "deploy.export",
    "export_checkpoint": "deploy.export", "export_model": "deploy.export", "load": "deploy.auto",
    "InferenceLinear": "deploy.engine", "compile_model": "deploy.engine",
    "convert_for_inference": "deploy.engine", "set_engine": "deploy.engine",
    "OrtModel": "deploy.onnx_runtime", "load_onnx": "deploy.onnx_runtime",
    "to_onnx": "deploy.onnx_export",
    "profile_model": "deploy.profile",
    "load_teacher": "deploy.teacher",
}

__all__ = [*_HOMES, "__version__"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'bitvit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"bitvit.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
