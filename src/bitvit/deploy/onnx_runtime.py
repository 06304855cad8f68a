"""Open and run bitvit ONNX files (`bitvit.deploy.onnx_export`'s graphs) with ONNX Runtime.

`OrtModel` (and `load_onnx`) wrap an ``onnxruntime.InferenceSession`` (CPU) as an
`ExportedModel`: logits for normalized images, predictions, and the class names, config and
preprocessing that the file's ``metadata_props`` hold. `metadata_of` reads those with onnx
alone; `resolve_engine` picks the ort engine for ``.onnx`` paths.

A file is checked before ONNX Runtime sees it: at most `MAX_ONNX_BYTES`, only the operators
bitvit's exporter writes (`GRAPH_OPS`: no control flow, no subgraphs, no external data), an
input and output that fit its metadata; any error ONNX Runtime raises while running is one line.
While running, the tensors ONNX Runtime allocates stop at `arena_cap` (most of the memory that
was available; weights aside).

onnx and onnxruntime are optional (``pip install -e ".[onnx]"``): imported on use.
"""

from __future__ import annotations

import threading
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
# protobuf's own limit for one message: a bigger graph needs external data, which bitvit never
# writes (and which would let a file read any other file).
MAX_ONNX_BYTES = (1 << 31) - 1
ORT_SILENT = 4  # ORT's log severity FATAL: its errors become bitvit's one line, not its own
# Every (domain, operator) `bitvit.deploy.onnx_export` writes ("" is ONNX's own domain), for
# every method, act_bits and act_quant (tests/test_onnx.py exports them all and checks this).
# Anything else is refused at load: control flow (Loop, Scan, If) can run for ever, and
# allocation ops (ConstantOfShape, Tile, Range, ...) take their size from the data.
GRAPH_OPS = frozenset({("", op) for op in (
    "Abs", "Add", "Cast", "Concat", "Div", "DynamicQuantizeLinear", "Erf", "Expand",
    "GreaterOrEqual", "Identity", "LayerNormalization", "MatMul", "MatMulInteger", "Max", "Mul",
    "Neg", "QuantizeLinear", "ReduceMax", "ReduceMean", "ReduceMin", "Reshape", "Shape", "Slice",
    "Softmax", "Squeeze", "Tanh", "Transpose", "Where")} | {("com.microsoft", op) for op in (
        "DynamicQuantizeMatMul", "FusedMatMul", "MatMulIntegerToFloat")})


# ONNX Runtime's CPU arena, shared by every session of this process, stops at this share of the
# memory available when the first session starts (`bitvit.system.host_memory`), at least
# `ARENA_FLOOR`: a graph whose tensors grow past it while running (an Expand to 10^5 x 10^5
# floats) fails its run in one line instead of taking the machine's memory. The cap is there to
# stop runaway growth, not to ration memory a batch could use. Weights (initializers) and
# ORT's per-thread buffers are outside it.
ARENA_SHARE = 0.8
ARENA_FLOOR = 1 << 26
_arena: dict[str, int | None] = {}  # "cap": bytes once registered (None: memory unknown)
_arena_lock = threading.Lock()


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


def _reason(e: BaseException) -> str:
    """A library error's first line, cut short: bitvit's message carries it."""
    from bitvit.files import error_reason

    return error_reason(e, 200)


def _node(node: Any) -> str:
    return f"node {node.name[:80]!r}" if node.name else "an unnamed node"


def _read_graph(path: Path) -> bytes:
    """The bytes of the .onnx file ``path``, a regular file within `MAX_ONNX_BYTES`."""
    from bitvit.files import FileRefused, read_limited

    try:
        return read_limited(path, "bitvit ONNX export", MAX_ONNX_BYTES)
    except FileRefused as e:
        raise ExportError(str(e)) from None
    except OSError as e:
        raise ExportError(f"{path}: cannot read ({e.strerror or _reason(e)})") from None


def check_graph(data: bytes, label: str) -> None:
    """Refuse a serialized graph that bitvit's exporter could not have written: an operator
    outside `GRAPH_OPS`, a subgraph, external or sparse data. Read with onnx, before ONNX
    Runtime builds a session (which already folds constants) or runs anything."""
    onnx = import_optional("onnx")
    try:
        graph = onnx.load_model_from_string(data).graph
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and others
        raise ExportError(f"{label}: not a readable ONNX model ({_reason(e)})") from None
    graph_types = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    for node in graph.node:
        op = (node.domain if node.domain != "ai.onnx" else "", node.op_type)
        if op not in GRAPH_OPS:
            raise ExportError(f"{label}: uses the operator {'.'.join(filter(None, op))!r} "
                              f"({_node(node)}), which bitvit's ONNX export never writes; "
                              "expected a graph written by `bitvit export --format onnx`")
        if any(a.type in graph_types for a in node.attribute):
            raise ExportError(f"{label}: {_node(node)} ({node.op_type}) holds a subgraph; a "
                              "bitvit ONNX export has none")
    if graph.sparse_initializer or any(t.data_location == onnx.TensorProto.EXTERNAL
                                       for t in graph.initializer):
        raise ExportError(f"{label}: holds external or sparse tensor data; a bitvit ONNX export "
                          "keeps every tensor in the file")


def arena_cap() -> int | None:
    """The bytes ONNX Runtime may take in this process (its sessions' shared CPU arena),
    registered on the first call; None where the memory available is unknown (no cap)."""
    with _arena_lock:  # once per process: two threads opening sessions register one arena
        if "cap" not in _arena:
            from bitvit import system

            ort = import_optional("onnxruntime")
            memory = system.host_memory()
            cap = None if memory is None else max(int(memory[0] * ARENA_SHARE), ARENA_FLOOR)
            if cap is not None:
                try:
                    ort.create_and_register_allocator(ort.OrtMemoryInfo(
                        "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                        ort.OrtMemType.DEFAULT), ort.OrtArenaCfg(cap, -1, -1, -1))  # -1: defaults
                except Exception:  # noqa: BLE001 - an ORT build without env allocators: no cap
                    cap = None
            _arena["cap"] = cap
        return _arena["cap"]


def _session(source: str | bytes, label: str, threads: int | None,
             profile: str | Path | None) -> Any:
    """An ONNX Runtime CPU session on a file or serialized graph, with bitvit's options."""
    ort = import_optional("onnxruntime")
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads}: expected 1 or more")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.log_severity_level = ORT_SILENT  # its errors are raised and become bitvit's line
    # ORT's workers busy-wait between calls by default: they would take the cores from
    # whatever the process runs next (torch, another session), which costs more than it saves.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if arena_cap() is not None:
        options.add_session_config_entry("session.use_env_allocators", "1")
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own pybind classes
        raise ExportError(f"{label}: not a readable ONNX model ({_reason(e)})") from None


def _describe(arg: Any) -> str:
    """An ORT NodeArg as ``float (N, 3, 32, 32)``; ``?`` for an unknown dimension."""
    kind = arg.type.removeprefix("tensor(").removesuffix(")")
    dims = "unknown shape" if arg.shape is None else ", ".join(
        "?" if d is None else str(d) for d in arg.shape)
    return f"{kind} ({dims})"


def _check_signature(session: Any, label: str, preprocessing: Any,
                     classes: list[str] | None) -> None:
    """The graph must take what the metadata's preprocessing makes and give one float logit
    per class name: else ORT fails on every batch, or eval and predict misread its output."""
    (images,) = session.get_inputs()
    logits = next(o for o in session.get_outputs() if o.name == "logits")
    size = [] if preprocessing is None else [preprocessing.channels,
                                             preprocessing.image_size, preprocessing.image_size]
    shape = images.shape or []
    if (images.type != "tensor(float)" or len(shape) != 4
            or (size and list(shape[1:]) != size)):
        raise ExportError(f"{label}: the graph's input 'images' is {_describe(images)}; expected "
                          f"float (N, {', '.join(map(str, size or ['C', 'S', 'S']))})"
                          + (" as its metadata's preprocessing makes" if size else ""))
    shape = logits.shape or []
    if (logits.type != "tensor(float)" or len(shape) != 2
            or (classes is not None and shape[1] != len(classes))):
        n = "classes" if classes is None else str(len(classes))
        raise ExportError(f"{label}: the graph's output 'logits' is {_describe(logits)}; expected "
                          f"float (N, {n})" + ("" if classes is None else
                                               ", one per class name in its metadata"))


class _Session(nn.Module):
    """An ONNX Runtime session as a module: normalized float (N, C, S, S) -> logits.
    ``num_classes``: the logits' width (None: unchecked). Errors name ``label``."""

    def __init__(self, session: Any, label: str, num_classes: int | None) -> None:
        super().__init__()
        self.session, self.label, self.num_classes = session, label, num_classes
        ort = import_optional("onnxruntime")
        self.run_options = ort.RunOptions()
        self.run_options.log_severity_level = ORT_SILENT  # the error is raised, not logged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().to("cpu", torch.float32).contiguous().numpy()
        try:
            (logits,) = self.session.run(["logits"], {"images": images}, self.run_options)
        except Exception as e:  # noqa: BLE001 - ORT raises its own pybind classes
            if "Available memory of" in str(e) and (cap := _arena.get("cap")) is not None:
                from bitvit.system import human_bytes

                raise ExportError(
                    f"{self.label}: running the graph on {len(images)} image(s) needs more "
                    f"memory than ONNX Runtime may take here ({human_bytes(cap)}: "
                    f"{ARENA_SHARE:.0%} of what was available when its first session started, at "
                    f"least {human_bytes(ARENA_FLOOR)}); fewer images at once need less") from None
            raise ExportError(f"{self.label}: ONNX Runtime failed running the graph on "
                              f"{len(images)} image(s) ({_reason(e)})") from None
        # The declared output can lie: the run's own shape and type must fit too.
        if (logits.dtype != "float32" or logits.shape[:1] != images.shape[:1] or logits.ndim != 2
                or self.num_classes not in (None, logits.shape[1])):
            raise ExportError(f"{self.label}: the graph gave logits {logits.dtype} "
                              f"{tuple(logits.shape)} for {len(images)} image(s); expected "
                              f"float32 ({len(images)}, {self.num_classes or 'classes'})")
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
        import_optional("onnxruntime")  # first: the message names what is missing
        if isinstance(model, bytes):
            path = Path(name) if name is not None else None
            label = str(name) if name is not None else "ONNX model (in memory)"
            data = model
        else:
            path = Path(model)
            label = str(path)
            if not path.exists():
                raise ExportError(f"{path}: no such file")
            if path.is_dir():
                raise ExportError(f"{path}: no such file (a folder)")
            data = _read_graph(path)  # read once: what is checked is what ORT runs
        check_graph(data, label)
        session = _session(data, label, threads, profile)
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
        _check_signature(session, label, preprocessing, classes)
        super().__init__(_Session(session, label, None if classes is None else len(classes)),
                         config, classes, preprocessing, path)
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
    """The ``metadata_props`` of an ONNX file, read with onnx (no session), within the same
    limits as `OrtModel` (a regular file of at most `MAX_ONNX_BYTES`)."""
    onnx = import_optional("onnx")
    data = _read_graph(Path(path))
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and the like
        raise ExportError(f"{path}: not a readable ONNX model ({_reason(e)})") from None
    return {p.key: p.value for p in proto.metadata_props}

