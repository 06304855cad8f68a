"""Starting from a pretrained model: ``bitvit train --init-from`` and `load_pretrained`.

A source is a bitvit checkpoint (a run folder, a checkpoint folder or its model.safetensors), a
Hugging Face ViT/DeiT folder, or a timm state dict in a .safetensors file
(`bitvit.nn.pretrained`). Which settings the model takes from where is decided here, in
`source_config`, and nowhere else:

- the architecture (`bitvit.nn.pretrained.ARCH_KEYS`: patch size, dim, depth, heads, MLP size,
  pooling, norms, qkv bias, GELU) is the source's. A config file's ``model:`` section does not
  change it; a ``model.*`` override on the command line that contradicts it is a one-line
  `ConfigError` naming both values. A key the source only guesses (a timm file's heads) takes
  the override, or, for a whole `Config` handed to `bitvit.train`, the config's value.
- ``model.image_size`` and ``model.num_classes`` are the config's when it gives them (a config
  file or an override; a `Config` always does), else the source's. Another image size
  resamples the position embeddings; another class count gets a freshly initialised head.
- dropout, attention dropout and drop path are the config's (training settings).
- ``data.mean``/``data.std``: the source's normalization (Hugging Face's
  preprocessor_config.json, a bitvit checkpoint's config) where the config says ``auto``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bitvit.data import AUTO
from bitvit.files import sha256
from bitvit.nn.model import VisionTransformer, ViTConfig
from bitvit.nn.pretrained import ARCH_KEYS, PretrainedError, fit_state, read_pretrained
from bitvit.training.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    load_checkpoint,
    load_state,
    read_metadata,
)
from bitvit.training.config import (
    Config,
    ConfigError,
    Override,
    apply_overrides,
    config_with_overrides,
    load_config,
    override_key,
    read_yaml_mapping,
    short_repr,
    typed_value,
)

# What a run may set apart from the source's architecture.
SIZE_KEYS = ("image_size", "num_classes")


@dataclass
class Source:
    """A pretrained model, read: its own ViT settings and its weights in bitvit's names."""

    path: Path  # the weights file
    kind: str  # bitvit | huggingface | timm
    model: dict[str, Any]  # ViTConfig keys; num_classes None: no classifier head
    state: dict[str, torch.Tensor]
    guessed: frozenset[str] = frozenset()
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    classes: list[str] | None = None  # what its head's rows are, where the source says

    def record(self) -> dict[str, str]:
        """What run.json records of it."""
        return {"path": str(self.path), "kind": self.kind, "sha256": sha256(self.path)}


def read_source(path: str | Path) -> Source:
    """A bitvit checkpoint, a Hugging Face folder or a timm .safetensors file; `CheckpointError`
    (one line naming the file) for anything else or anything bitvit's ViT cannot express."""
    p = Path(path)
    is_safetensors = p.is_file() and p.suffix == ".safetensors"
    file_format = read_metadata(p).get("format") if is_safetensors else None
    if file_format == "bitvit-export":
        raise CheckpointError(f"{p}: a bitvit export (packed for inference); start from the "
                              "training checkpoint it was exported from")
    if file_format == CHECKPOINT_FORMAT or (p.is_dir() and not (p / "config.json").is_file()):
        ckpt = load_checkpoint(p)
        c = ckpt.config
        numbers = not isinstance(c.data.mean, str) and not isinstance(c.data.std, str)
        return Source(ckpt.path, "bitvit", dataclasses.asdict(c.model), ckpt.model.state_dict(),
                      mean=c.data.mean if numbers else None, std=c.data.std if numbers else None,
                      classes=ckpt.classes)
    try:
        pre = read_pretrained(p)
    except PretrainedError as e:
        raise CheckpointError(str(e)) from None
    # Hugging Face names the rows of a head trained without labels LABEL_0, LABEL_1...
    named = pre.classes is not None and not all(re.fullmatch(r"LABEL_\d+", c) for c in pre.classes)
    return Source(pre.path, pre.kind, pre.arch, pre.state, pre.guessed, pre.mean, pre.std,
                  pre.classes if named else None)


def _same(key: str, ours: Any, theirs: Any, dim: int) -> bool:
    if key == "mlp_ratio":  # the MLP's size is what matters: int(dim * ratio)
        return int(dim * ours) == int(dim * theirs)
    if key == "norm_eps":
        return math.isclose(ours, theirs, rel_tol=1e-6)
    return ours == theirs


def source_model(source: Source, config_model: Mapping[str, Any],
                 given: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model:`` section of a run that starts from ``source``: the rules of the module's
    docstring, in one place.

    ``config_model``: a config file's model section, or a whole config's: its sizes
    (image_size, num_classes) where it has them, and its other non-architecture keys.
    ``given``: ``model.*`` values set explicitly (command line, `load_pretrained`'s arguments),
    typed: they win, and an architecture key among them must agree with the source, unless the
    source only guessed it (a timm file's heads).
    """
    theirs = source.model
    for key, value in given.items():
        if key in ARCH_KEYS and key not in source.guessed and not _same(key, value, theirs[key],
                                                                        theirs["dim"]):
            raise ConfigError(f"model.{key}={value!r} contradicts the source {source.path}, "
                              f"whose {key} is {theirs[key]!r}: the architecture of a "
                              f"pretrained model is its own; leave model.{key} out")
    model = {k: v for k, v in config_model.items() if k not in ARCH_KEYS}
    model.update({k: theirs[k] for k in ARCH_KEYS})
    model.update({k: theirs[k] for k in SIZE_KEYS
                  if k not in config_model and theirs[k] is not None})
    model.update(given)
    if model["heads"] is None:
        raise ConfigError(f"{source.path}: a timm state dict does not record the number of "
                          f"heads, and dim {theirs['dim']} is not a multiple of timm's 64-wide "
                          "heads; give model.heads=N")
    return model


def source_config(config: Config, source: Source) -> Config:
    """``config`` as a run from ``source`` uses it: the source's architecture (a guessed key
    keeps the config's value), the config's sizes, and the source's normalization where the
    config says auto. What `bitvit.train` applies; a no-op on `load_run_config`'s result."""
    m = dataclasses.asdict(config.model)
    model = source_model(source, m, {k: m[k] for k in source.guessed})
    data = config.data
    if source.mean is not None and data.mean == AUTO:
        data = replace(data, mean=tuple(source.mean))
    if source.std is not None and data.std == AUTO:
        data = replace(data, std=tuple(source.std))
    try:
        return replace(config, model=ViTConfig(**model), data=data)
    except (ValueError, ConfigError) as e:
        raise ConfigError(f"{source.path}: {e}") from None


def load_run_config(path: str | Path | None, overrides: Iterable[Override] = ()) -> Config:
    """What ``bitvit train`` runs: `bitvit.training.config.load_config`, but with
    ``train.init_from`` the model is the source's (`source_model`). The one place that tells
    the config file's model keys (architecture ignored) from the command line's (checked)."""
    overrides = list(overrides)
    in_file = {} if path is None else read_yaml_mapping(
        path, "config file", "sections model, quant, data, train")
    raw = apply_overrides(in_file, overrides)
    init_from = raw["train"].get("init_from") if isinstance(raw.get("train"), dict) else None
    file_model = in_file.get("model") or {}
    if not isinstance(init_from, str) or not init_from or not isinstance(file_model, dict):
        return load_config(path, overrides)  # as before; a bad value is named there
    given = {k: typed_value("model", k, v, "command line")
             for k, v in (apply_overrides({}, overrides).get("model") or {}).items()}
    source = read_source(init_from)
    # The model section is the source's with the command line's model keys (given) applied.
    base = {**in_file, "model": source_model(source, file_model, given)}
    rest = [o for o in overrides if override_key(o).split(".")[0] != "model"]
    return source_config(config_with_overrides(base, rest, str(path or "config")), source)


def init_model(model: torch.nn.Module, source: Source, config: Config,
               classes: list[str] | None = None) -> list[str]:
    """Load ``source``'s weights into ``model`` (built from ``config``, quantized or not);
    returns what had to change (position embeddings resampled, a new head), a guessed key the
    config set otherwise (a timm file's heads), and a kept head whose classes are not
    ``classes`` (the data's), one line each."""
    state, notes = fit_state(source.state, source.model, config.model, model.state_dict())
    load_state(model, state, source.path)
    if (classes is not None and source.classes is not None and "head.weight" in source.state
            and source.model["num_classes"] == config.model.num_classes
            and list(source.classes) != list(classes)):
        notes.append(f"the head is the source's, whose rows are the classes "
                     f"{short_repr(list(source.classes))}, not the data's "
                     f"{short_repr(list(classes))}: each starts as another class's")
    for key in sorted(source.guessed):  # the weights fit any value: a wrong one goes unnoticed
        ours, guess = getattr(config.model, key), source.model[key]
        if ours != guess:
            notes.append(f"model.{key}={ours} is the config's: {source.path} does not record "
                         f"{key} (its convention gives {guess}); make sure {ours} is the source's")
    return notes


def load_pretrained(path: str | Path, **model: Any) -> tuple[VisionTransformer, ViTConfig]:
    """A full-precision `VisionTransformer` (eval mode) with a pretrained model's weights, and
    its config.

    ``path``: a Hugging Face ViT/DeiT folder, a timm .safetensors state dict, or a bitvit
    checkpoint (its latent weights, unquantized: `bitvit.load_checkpoint` gives the model as
    trained). ``model``: ``model.*`` settings, as on the command line: ``image_size`` and
    ``num_classes`` may differ from the source's (position embeddings resampled, a new head,
    each with a warning), ``heads`` is needed for a timm file whose dim is not a multiple of
    64; an architecture setting that contradicts the source raises `ConfigError`. Unreadable
    or inexpressible sources raise `CheckpointError`; both say what in one line.
    """
    source = read_source(path)
    given = {k: typed_value("model", k, v, "load_pretrained") for k, v in model.items()}
    config = Config.from_dict({"model": source_model(source, {}, given)}, "load_pretrained")
    vit = VisionTransformer(config.model)
    for note in init_model(vit, source, config):
        warnings.warn(f"{source.path}: {note}", stacklevel=2)
    return vit.eval(), config.model
