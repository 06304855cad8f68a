"""`bitvit.load` and its default, ``engine="auto"``: the fastest engine on this machine among
those that compute an export's exact function.

The candidates:

- ``int``: torch, the integer kernels (`bitvit.deploy.engine`, with `bitvit.nn.kernels`'s choice);
- ``fp``: torch, the fake-quant arithmetic of training's plain path (`bitvit.deploy.engine`);
- ``ort``: ONNX Runtime on the export's exact per-token graph (`bitvit.deploy.onnx_export`,
  ``act_quant="token"``), built in memory from the safetensors file; only on the CPU, and only
  where onnx and onnxruntime are installed. The per-tensor graph is never a candidate: it is
  approximate, and an image's logits depend on its batch mates.

Auto is decided once per machine and model shape, by a short measurement (`measure_speeds`): a
few forward passes of each candidate on random images at batch 1 and 32, interleaved, each
engine's best time counting; its speed is the geometric mean over the two batches of the int
engine's time over its own (int: 1). The fastest wins (a tie: int, then fp). The speeds are
cached in ``engines.json`` in the bitvit cache folder (`bitvit.files.resolve_cache_dir`),
keyed by the machine (`machine_key`: CPU model, ISA, threads, the int kernel, torch and
onnxruntime versions) and the model's shape (`model_key`: the architecture and its quantization,
not the weights): a new process reads the verdict instead of measuring. An unreadable cache is
measured again. ``$BITVIT_ENGINE=int|fp|ort`` overrides auto. With ``compile=True`` auto is
``int`` (torch.compile applies to the torch engines; compiled speed is not measured).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from bitvit.deploy import export
from bitvit.deploy.export import ExportedModel, ExportError, model_metadata
from bitvit.deploy.onnx_runtime import (
    ENGINE_AUTO,
    ENGINE_ORT,
    OnnxUnavailableError,
    OrtModel,
    import_optional,
    is_onnx_file,
    resolve_engine,
)
from bitvit.files import EnvError, read_cache, resolve_cache_dir, save_cache, tilde
from bitvit.nn.kernels import choose_kernel, cpu_isa, isa_summary
from bitvit.training.config import Config, resolve_device

ENGINES = (ENGINE_AUTO, "int", "fp", ENGINE_ORT)
TORCH_ENGINES = ("int", "fp")
ENGINE_ENV = "BITVIT_ENGINE"
CACHE_FILE = "engines.json"
CACHE_VERSION = 1
BATCHES = (1, 32)  # one image, and a moderate batch
BUDGET_S = 0.5  # per batch size: timed rounds stop once this much has been spent...
MAX_ROUNDS = 10  # ...or after this many (the best of several resists a shared core's noise)


@dataclass(frozen=True)
class EngineChoice:
    name: str  # int, fp or ort
    reason: str  # why, in one line
    speed: dict[str, float]  # each candidate's measured speed relative to int; {} if unmeasured


def load(path: str | Path, device: str | torch.device = "cpu", engine: str = ENGINE_AUTO,
         compile: bool = False) -> ExportedModel:
    """Load an exported model for inference: an `ExportedModel` in eval mode.

    ``engine``: ``auto`` (the default: the fastest exact engine on this machine, see the module
    docstring), ``int``, ``fp`` (`bitvit.deploy.export.load`) or ``ort`` (ONNX Runtime on the
    exact per-token graph, built in memory; CPU). An ``.onnx`` file runs on ort
    (`bitvit.deploy.onnx_runtime.OrtModel`). ``device``: cpu, cuda[:N] or auto (cuda if
    available; the CPU for ort). ``compile``: torch.compile the ViT (torch engines only).
    ``model.engine`` says which engine runs, ``model.engine_reason`` why. Raises `ExportError`
    (one line naming the file) for a bad file or an engine that cannot run it as asked.
    """
    engine = resolve_engine(path, engine)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if engine == ENGINE_ORT:
        _check_ort(path, device, compile, "")
        if is_onnx_file(path):
            return OrtModel(path)
        model = ort_model(path)
        model.engine_reason = "given"
        return model
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if engine in TORCH_ENGINES:
        return export.load(path, device=dev, engine=engine, compile=compile)
    choice, built = _decide(path, dev, compile)
    if choice.name == ENGINE_ORT:  # only $BITVIT_ENGINE picks ort for a GPU or compile
        _check_ort(path, device, compile, f" (${ENGINE_ENV}={ENGINE_ORT})")
    model = built.get(choice.name) or (
        ort_model(path) if choice.name == ENGINE_ORT else
        export.load(path, device=dev, engine=choice.name, compile=compile))
    model.engine, model.engine_reason = choice.name, choice.reason
    return model


def choose_engine(path: str | Path, device: str | torch.device = "cpu") -> EngineChoice:
    """The engine ``engine="auto"`` runs the export ``path`` with on ``device``, and why
    (measured now if not cached; `bitvit profile` names it)."""
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    return _decide(path, dev, False)[0]


def ort_model(path: str | Path, int_model: ExportedModel | None = None) -> OrtModel:
    """The safetensors export ``path`` on ONNX Runtime: its exact per-token graph, built in
    memory from the loaded model (``int_model``, else loaded now), with ONNX Runtime's
    intra-op threads torch's."""
    from bitvit.deploy.onnx_export import onnx_model

    source = int_model if int_model is not None else export.load(path, engine="int")
    proto = onnx_model(source, "token", metadata=model_metadata(source.config, source.classes))
    model = OrtModel(proto.SerializeToString(), threads=torch.get_num_threads(), name=path)
    model.engine_reason = ""
    return model


def _check_ort(path: str | Path, device: str | torch.device, compile: bool, why: str) -> None:
    if compile:
        raise ExportError(f"{path}: compile (--compile) applies to the int and fp engines; the "
                          f"ort engine{why} runs ONNX Runtime's graph as it is")
    if str(device) not in ("auto", "cpu"):
        raise ExportError(f"{path}: the ort engine{why} runs on the CPU; device {device} "
                          "(--device) applies to the int and fp engines")


# ---------------------------------------------------------------------------------------------
# The decision.
# ---------------------------------------------------------------------------------------------


def cache_path() -> Path:
    return resolve_cache_dir() / CACHE_FILE


def _onnxruntime_version() -> str | None:
    """onnxruntime's version where the ort engine can run (onnx importable too), else None."""
    try:
        version = import_optional("onnxruntime").__version__
    except OnnxUnavailableError:
        return None
    # onnx is imported only to build the graph (a second or so): here it need only be there.
    return version if importlib.util.find_spec("onnx") is not None else None


def machine_key(device: torch.device, ort_version: str | None) -> str:
    """What the speeds depend on besides the model: the processor, its ISA, the threads, the
    integer kernel and the libraries."""
    if device.type == "cpu":
        threads = torch.get_num_threads()
        where = f"{cpu_isa()['model_name']} | {isa_summary()} | {threads} threads"
    else:
        where = (torch.cuda.get_device_name(device) if device.type == "cuda" else device.type)
    return (f"{where} | int kernel {choose_kernel(device).name} | torch {torch.__version__} | "
            f"onnxruntime {ort_version or 'none'}")


def model_key(config: Config) -> str:
    """The model's shape: its architecture and quantization (not its weights). Every key an
    engine computes differently is in it (ONNX Runtime fuses the exact and tanh GELUs
    otherwise, say); the training-only ones (dropout) are not."""
    m, q = config.model, config.quant
    return (f"ViT {m.image_size}px {m.in_channels}ch patch {m.patch_size} dim {m.dim} depth "
            f"{m.depth} heads {m.heads} mlp {m.mlp_ratio:g} {m.pooling} pooling "
            f"{m.num_classes} classes norm_eps {m.norm_eps:g} final_norm {m.final_norm} "
            f"qkv_bias {m.qkv_bias} gelu {m.gelu} | {q.method} where {q.where} act_bits "
            f"{q.act_bits} patch_embed {q.include_patch_embed} sub_norm {q.sub_norm}")


def _cached_speed(entry: object, candidates: list[str]) -> dict[str, float] | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("speed"), dict):
        return None
    speed = entry["speed"]
    # A candidate that could not be built when measured (ort without a working onnx) stays out
    # rather than sending every load to measure again.
    unavailable = entry.get("unavailable", [])
    if isinstance(unavailable, list):
        candidates = [name for name in candidates if name not in unavailable]
    # A speed ratio of a sane measurement; 10**400 (a hand-edited file) would overflow float().
    ok = bool(candidates) and all(
        isinstance(speed.get(name), (int, float)) and not isinstance(speed[name], bool)
        and 0 < speed[name] < 1e6 for name in candidates)
    return {name: float(speed[name]) for name in candidates} if ok else None


def _decide(path: str | Path, device: torch.device, compile: bool,
            ) -> tuple[EngineChoice, dict[str, ExportedModel]]:
    """Auto's choice, and the models built to measure it (none when it was not measured)."""
    override = os.environ.get(ENGINE_ENV)
    if override and override != ENGINE_AUTO:
        if override not in ENGINES:
            raise EnvError(f"${ENGINE_ENV}={override!r}: expected one of {', '.join(ENGINES)}")
        return EngineChoice(override, f"set by ${ENGINE_ENV}={override}", {}), {}
    if compile:
        return EngineChoice("int", "compile: the int engine, compiled (torch.compile applies to "
                            "the torch engines; not measured)", {}), {}
    config = export.parse_model_metadata(Path(path), export.read_export_metadata(path))[0]
    ort_version = _onnxruntime_version() if device.type == "cpu" else None
    candidates = [*TORCH_ENGINES, *([ENGINE_ORT] if ort_version else [])]
    key = f"{machine_key(device, ort_version)} || {model_key(config)}"
    file = cache_path()
    entries = read_cache(file, CACHE_VERSION, "engine cache")
    speed = _cached_speed(entries.get(key), candidates)
    built: dict[str, ExportedModel] = {}
    where = f"cached {tilde(file)}"
    if speed is None:
        built = _build(path, device, candidates)
        speed = {name: round(v, 3) for name, v in measure_speeds(built, _image_shape(config),
                                                                 device).items()}
    fastest = max(speed, key=speed.__getitem__)  # the first of equals: int, fp, ort
    if built:
        entries[key] = {"engine": fastest, "speed": speed, "batches": list(BATCHES),
                        "unavailable": [name for name in candidates if name not in built],
                        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        where = save_cache(file, CACHE_VERSION, entries, "engine cache")
    listed = ", ".join(f"{n} {v:.2f}x" for n, v in sorted(speed.items(), key=lambda kv: -kv[1]))
    missing = ("" if device.type != "cpu" or ENGINE_ORT in speed
               else "; ort not a candidate: onnx/onnxruntime not installed" if not ort_version
               else "; ort not a candidate: its ONNX graph could not be built (onnx unusable)")
    reason = (f"fastest of {listed} the int engine's speed (batches "
              f"{' and '.join(map(str, BATCHES))}; {where}{missing})")
    return EngineChoice(fastest, reason, speed), built


def _image_shape(config: Config) -> tuple[int, int, int]:
    m = config.model
    return m.in_channels, m.image_size, m.image_size


def _build(path: str | Path, device: torch.device,
           candidates: list[str]) -> dict[str, ExportedModel]:
    """Each candidate engine's model: torch int on ``device``, fp a copy of it (no second
    unpacking of the file), ort from it (a graph that cannot be built for want of onnx leaves
    ort out)."""
    from bitvit.deploy.engine import set_engine

    int_model = export.load(path, device=device, engine="int")
    fp_model = copy.deepcopy(int_model)
    set_engine(fp_model.vit, "fp")
    fp_model.engine = "fp"
    models: dict[str, ExportedModel] = {"int": int_model, "fp": fp_model}
    if ENGINE_ORT in candidates:
        with contextlib.suppress(OnnxUnavailableError):
            models[ENGINE_ORT] = ort_model(path, models["int"])
    return models


def _seconds(model: nn.Module, x: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    start = time.perf_counter()
    model(x)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - start


@torch.inference_mode()
def measure_speeds(models: dict[str, nn.Module], shape: tuple[int, int, int],
                   device: torch.device | str = "cpu") -> dict[str, float]:
    """Each model's speed relative to ``models["int"]`` (> 1: faster) on random normalized
    images of ``shape`` (C, S, S): per batch size of `BATCHES`, one warm-up call each, then
    rounds of one call each, interleaved (each round starting one model further on), until
    `BUDGET_S` is spent (at least one round, at most `MAX_ROUNDS`); the geometric mean over the
    batch sizes of int's best time over the model's."""
    gen = torch.Generator().manual_seed(0)
    names = list(models)
    log_speed = dict.fromkeys(names, 0.0)
    for batch in BATCHES:
        x = torch.randn(batch, *shape, generator=gen).to(device)
        for name in names:  # warm-up: first calls pay for allocation and kernel selection
            models[name](x)
        best = dict.fromkeys(names, math.inf)
        start = time.perf_counter()
        for round_ in range(MAX_ROUNDS):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                best[name] = min(best[name], _seconds(models[name], x))
            if time.perf_counter() - start > BUDGET_S:
                break
        for name in names:
            log_speed[name] += math.log(best["int"] / best[name])
    return {name: math.exp(v / len(BATCHES)) for name, v in log_speed.items()}
