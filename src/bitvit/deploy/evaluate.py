"""`bitvit.evaluate`: a model on its test data, from a run folder, a checkpoint, an exported
file, or a module in memory. Loading (checkpoint, export, engine) is this module's business; the
metrics themselves are `bitvit.training.evaluation`'s, which training uses every epoch.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitvit.data import DataError, ImageSet, load_data, normalize
from bitvit.training import memory, rundir
from bitvit.training.checkpoint import CheckpointError, load_checkpoint
from bitvit.training.config import ConfigError, resolve_device
from bitvit.training.evaluation import evaluate_model


def evaluate(source: str | Path | nn.Module, data: str | Path | ImageSet | None = None,
             mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None, *,
             best: bool = False, limit_test: int | None = None, engine: str = "auto",
             compile: bool = False, batch_size: int | None = None,
             device: str | torch.device = "auto") -> dict[str, Any]:
    """Evaluate a model on its test set: the report ``bitvit eval`` prints, as a dict.

    ``source`` is a run folder (its ``last/``, or ``best/`` with ``best=True``), a checkpoint
    folder or ``model.safetensors`` file, or an exported ``.safetensors`` file (loaded with
    `bitvit.load` and ``engine``, ``compile``); these load on ``device`` (auto: cuda if
    available). ``engine``: auto (the fastest exact engine here: `bitvit.deploy.auto`), int, fp
    or ort; an ``.onnx`` export runs on ONNX Runtime (``engine`` auto or ``"ort"``; CPU). It may
    also be a model in memory: an `ExportedModel` (or `bitvit.deploy.onnx_runtime.OrtModel`), or
    any module given with ``data`` as an `ImageSet` and the ``mean`` and ``std`` it was trained
    with.

    ``data`` is None (the model's own ``data.path``), a data file or folder (its test split;
    ``limit_test``: a class-balanced subset, by default the run's own), or an `ImageSet` used as
    is. For a training checkpoint ``compile`` wraps the model in ``torch.compile`` (eager if that
    fails); ``engine`` is for exported files (a checkpoint runs as trained: another engine
    than auto is refused).

    Returns ``{"model": file or None, "engine": the engine an exported model ran on (int, fp,
    ort; None for other models), "engine_reason": why, "n", "loss", "accuracy",
    "per_class_accuracy": {class: accuracy, None for a class without test images},
    "confusion_matrix": rows = true class, columns = predicted}``. Bad inputs raise one-line
    `CheckpointError`, `ExportError`, `DataError` or `ConfigError`.
    """
    from bitvit.deploy.engine import compile_model
    from bitvit.deploy.export import ExportedModel

    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ConfigError(f"evaluate: batch_size={batch_size!r}: expected an integer >= 1")
    if isinstance(source, (str, Path)):
        model, config, classes, path = _load(source, best, engine, compile, device)
    else:
        given = [name for name, on in (("best", best), ("engine", engine != "auto"),
                                       ("compile", compile), ("device", device != "auto")) if on]
        if given:
            raise TypeError(f"evaluate: {given[0]} applies when evaluate loads the model from a "
                            f"file; pass a path, or load the model with the option yourself")
        model, config, classes, path = source, None, None, None
    if isinstance(model, ExportedModel):
        config, classes, path = model.config, model.classes, model.path
        if model.preprocessing is not None:  # an ONNX graph without bitvit's metadata has none
            mean = mean or model.preprocessing.mean
            std = std or model.preprocessing.std
    elif config is not None:
        mean, std = mean or config.data.mean, std or config.data.std
    if data is None and config is not None and config.data.path is None and path is not None:
        data = _recorded_data(Path(path))  # the run found its data itself: where it was
    test, mean, std = _test_set(data, config, limit_test, mean, std)
    if classes is not None and test.classes != classes:
        raise DataError(f"{path or 'model'}: the model's classes ({', '.join(classes[:3])}...) "
                        f"differ from the data's ({', '.join(test.classes[:3])}...)")

    dev = getattr(model, "device", None) or next(iter(model.state_dict().values())).device
    if batch_size is None:
        batch_size = config.train.eval_batch_size if config is not None else 500
    if config is not None and torch.device(dev).type == "cpu":  # before a batch is allocated
        memory.check_inference_fits(config, str(path or "model"), batch_size)
    if compile and not isinstance(model, ExportedModel):
        example = normalize(test.images[:batch_size].to(dev), mean, std)
        model = compile_model(model.eval(), example)
    return {"model": None if path is None else str(path),
            "engine": getattr(model, "engine", None),
            "engine_reason": getattr(model, "engine_reason", None),
            **evaluate_model(model, test, mean, std, batch_size, dev)}


def _load(source: str | Path, best: bool, engine: str, compile: bool,
          device: str | torch.device) -> tuple[nn.Module, Any, Any, Any]:
    """(model, config, classes, path) of a run folder, checkpoint, export or ONNX file; the
    config, classes and path are None where the model carries them itself (an export)."""
    from bitvit.deploy.auto import load
    from bitvit.deploy.export import ExportError, is_export
    from bitvit.deploy.onnx_runtime import OrtModel, is_onnx_file

    if is_onnx_file(source) or is_export(source):
        if best:
            raise ExportError(f"{source}: an exported file has no best/ checkpoint; best "
                              "(--best) applies to run folders")
        model = load(source, device=device, engine=engine, compile=compile)
        if isinstance(model, OrtModel):
            model.needs_model_info()
        return model, None, None, None
    if engine != "auto":
        raise CheckpointError(f"{source}: engine {engine!r} (--engine) applies to exported "
                              "files; a training checkpoint runs as trained: export it with "
                              "`bitvit export` to choose an engine")
    dev = resolve_device(device, "device") if isinstance(device, str) else device
    ckpt = load_checkpoint(source, best=best)
    return ckpt.model.to(dev), ckpt.config, ckpt.classes, ckpt.path


def _recorded_data(checkpoint: Path) -> str | None:
    """The data file or folder that the run holding ``checkpoint`` (RUN/last/model.safetensors,
    RUN/model.safetensors) recorded in run.json, if it is still there. A run trained on data
    found through $BITVIT_DATA or the cache has no data.path in its config."""
    for run in (checkpoint.parent, checkpoint.parent.parent):
        if (run / rundir.CONFIG).is_file():
            recorded = rundir.read_info(run).get("data")
            return recorded if isinstance(recorded, str) and Path(recorded).exists() else None
    return None


def _test_set(data: str | Path | ImageSet | None, config: Any, limit_test: int | None,
              mean: Any, std: Any) -> tuple[ImageSet, tuple[float, ...], tuple[float, ...]]:
    """The test images (an `ImageSet` as given, or the test split of ``data`` or of the model's
    own data) and the mean and std to normalize them with."""
    if isinstance(data, ImageSet):
        if limit_test is not None:
            raise TypeError("evaluate: limit_test applies when evaluate reads the data; "
                            "subset the ImageSet yourself")
        test = data
    elif config is None:
        raise TypeError("evaluate: a model without a stored config needs data as an ImageSet "
                        "and its mean and std")
    else:
        if limit_test is not None and (isinstance(limit_test, bool) or not isinstance(
                limit_test, int) or limit_test < 1):
            raise DataError(f"evaluate: limit_test={limit_test!r}: expected a positive number "
                             "of test images (--limit-test)")
        # Only the test split: no validation carve-out, and the run's test subset by default.
        data_cfg = replace(config.data, path=str(data) if data is not None else config.data.path,
                           limit_test=limit_test if limit_test is not None
                           else config.data.limit_test, val_size=0)
        splits = load_data(data_cfg, config.model.image_size, config.model.in_channels)
        test = splits.test
        # A config saved unresolved says auto: use what auto resolves to on this data.
        mean = splits.mean if isinstance(mean, str) else mean
        std = splits.std if isinstance(std, str) else std
    if mean is None or std is None:
        raise TypeError("evaluate: a module evaluated on an ImageSet needs its mean and std")
    return test, mean, std
