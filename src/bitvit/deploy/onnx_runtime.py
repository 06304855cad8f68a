"""Open and run bitvit ONNX files (`bitvit.deploy.onnx_export`'s graphs) with ONNX Runtime.

`OrtModel` (and `load_onnx`) wrap an ``onnxruntime.InferenceSession`` (CPU) as an
`ExportedModel`: logits for normalized images, predictions, and the class names, config and
preprocessing that the file's ``metadata_props`` hold. `metadata_of` reads those with onnx
alone; `resolve_engine` picks the ort engine for ``.onnx`` paths.

onnx and onnxruntime are optional (``pip install -e ".[onnx]"``): imported on use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitvit.deploy.export import ExportedModel, ExportError, parse_model_metadata

ONNX_FORMAT = "bitvit-onnx"
ONNX_FORMAT_VERSION = "1"
ENGINE_ORT = "ort"
ENGINE_AUTO = "auto"
INSTALL_HINT = "pip install -e \".[onnx]\" (or pip install 'bitvit[onnx]')"


class OnnxUnavailableError(ExportError):
    """onnx or onnxruntime is not installed; the message says what to install."""


def import_optional(name: str) -> Any:
    """Import onnx or onnxruntime, or raise `OnnxUnavailableError` saying what to install."""
    try:
        return __import__(name)
    except ImportError:
        raise OnnxUnavailableError(f"ONNX export and the ort engine need the onnx and "
                                   f"onnxruntime packages ({name} is not installed): "
                                   f"{INSTALL_HINT}") from None


def is_onnx_file(path: str | Path) -> bool:
    """Whether ``path`` names an ONNX model (by its .onnx suffix)."""
    return Path(path).suffix.lower() == ".onnx"


def resolve_engine(path: str | Path, engine: str | None) -> str:
    """The engine to load ``path`` with: ``ort`` for .onnx files, else ``engine`` (None: auto).

    An .onnx file runs on ort (``engine`` None, ``auto`` or ``ort``); any other engine for it
    is a one-line `ExportError`. A safetensors export runs on any engine: int, fp, ort (its
    exact per-token graph, built in memory) or auto (`bitvit.deploy.auto`).
    """
    if is_onnx_file(path):
        if engine not in (None, ENGINE_AUTO, ENGINE_ORT):
            raise ExportError(f"{path}: an ONNX file runs on the ort engine (ONNX Runtime), "
                              f"not {engine!r}: drop --engine or pass --engine ort")
        return ENGINE_ORT
    return engine or ENGINE_AUTO


def _session(source: str | bytes, label: str, threads: int | None,
             profile: str | Path | None) -> Any:
    """An ONNX Runtime CPU session on a file or serialized graph, with bitvit's options."""
    ort = import_optional("onnxruntime")
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads}: expected 1 or more")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: the session's warnings are not the user's
    # ORT's workers busy-wait between calls by default: they would take the cores from
    # whatever the process runs next (torch, another session), which costs more than it saves.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own pybind classes
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"{label}: not a readable ONNX model ({first[:200]})") from None


class _Session(nn.Module):
    """An ONNX Runtime session as a module: normalized float (N, C, S, S) -> logits."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run(["logits"], {"images": images})
        return torch.from_numpy(logits).to(x.device)


class OrtModel(ExportedModel):
    """A bitvit ONNX graph run by ONNX Runtime (CPU), used like an `ExportedModel`.

    ``model``: an .onnx file, or the serialized graph itself (bytes, e.g. from
    `bitvit.deploy.onnx_export.onnx_model`, as the ort engine builds it from a safetensors
    export), with ``name`` the file it came from (for ``.path`` and messages).
    ``model(x)``: logits (a torch tensor) for normalized float images (N, C, S, S);
    ``model.logits(images_uint8)``, ``model.predict(images_uint8, top_k)``; ``.classes``,
    ``.preprocessing``, ``.config`` (None for a graph written by `to_onnx` without them),
    ``.metadata`` (all metadata_props), ``.act_quant``, ``.session`` (the
    ``onnxruntime.InferenceSession``). ``threads``: ONNX Runtime's intra-op threads (None: its
    default, one per core). ``profile``: a file prefix; ONNX Runtime then traces every run and
    ``model.session.end_profiling()`` writes the trace (``{profile}_{date}.json``) and returns
    its path. Raises `ExportError` (one line naming the file) for a missing, unreadable or
    non-bitvit graph.
    """

    def __init__(self, model: str | Path | bytes, threads: int | None = None,
                 profile: str | Path | None = None, name: str | Path | None = None) -> None:
        if isinstance(model, bytes):
            path = Path(name) if name is not None else None
            label = str(name) if name is not None else "ONNX model (in memory)"
        else:
            path = Path(model)
            label = str(path)
            if not path.is_file():
                raise ExportError(f"{path}: no such file"
                                  + (" (a folder)" if path.is_dir() else ""))
        session = _session(model if isinstance(model, bytes) else str(path), label, threads,
                           profile)
        meta = dict(session.get_modelmeta().custom_metadata_map)
        if meta.get("format") != ONNX_FORMAT:
            raise ExportError(f"{label}: not a bitvit ONNX export (metadata format "
                              f"{meta.get('format')!r}, expected {ONNX_FORMAT!r})")
        if meta.get("format_version") != ONNX_FORMAT_VERSION:
            raise ExportError(f"{label}: unknown bitvit ONNX format version "
                              f"{meta.get('format_version')!r} (this bitvit reads "
                              f"{ONNX_FORMAT_VERSION})")
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        if inputs != ["images"] or "logits" not in outputs:
            raise ExportError(f"{label}: expected input 'images' and output 'logits', got "
                              f"inputs {inputs} and outputs {outputs}")
        config = classes = preprocessing = None
        if "config" in meta:
            config, classes, preprocessing = parse_model_metadata(Path(label), meta)
        super().__init__(_Session(session), config, classes, preprocessing, path)
        self.session = session
        self.metadata = meta
        self.act_quant = meta.get("act_quant")
        self.engine = ENGINE_ORT
        self.engine_reason = "an ONNX file runs on ONNX Runtime"

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def needs_model_info(self) -> None:
        """Raise unless the file holds a config, class names and preprocessing."""
        if self.config is None:
            raise ExportError(f"{self.path}: has no config, class names or preprocessing in its "
                              "metadata (written by to_onnx without them): export it with "
                              "`bitvit export RUN --format onnx`")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        self.needs_model_info()
        return super().preprocess(images)


def load_onnx(path: str | Path, threads: int | None = None) -> OrtModel:
    """Load a bitvit ONNX export for ONNX Runtime (see `OrtModel`)."""
    return OrtModel(path, threads)


def metadata_of(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, read with onnx (no session)."""
    onnx = import_optional("onnx")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and OSError alike
        raise ExportError(f"{path}: not a readable ONNX model ({str(e).splitlines()[0]})"
                          ) from None
    return {p.key: p.value for p in proto.metadata_props}

