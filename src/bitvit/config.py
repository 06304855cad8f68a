"""Configs as plain data: four sections (model, quant, data, train), YAML files, CLI overrides.

Each section's dataclass lives beside the code that uses it; this module only composes them,
reads and writes YAML, and applies ``section.key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bitvit.data import DataConfig
from bitvit.model import ViTConfig
from bitvit.quant import QuantConfig


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line naming it."""


# train.device and --device: auto (cuda when available), cpu, cuda or cuda:N.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# Allowed values per section and key: (test, what the error says was expected). Types are already
# checked against the dataclass fields; these are the ranges a run would otherwise crash on.
Rule = tuple[Callable[[Any], bool], str]
POSITIVE_INT: Rule = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                      "an integer >= 1")
POSITIVE: Rule = (lambda v: _number(v) and v > 0, "a number > 0")
NON_NEGATIVE: Rule = (lambda v: _number(v) and v >= 0, "a number >= 0")
FRACTION: Rule = (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)")
RULES: dict[str, dict[str, Rule]] = {
    "model": {
        **dict.fromkeys(("image_size", "in_channels", "patch_size", "dim", "depth", "heads",
                         "num_classes"), POSITIVE_INT),
        "mlp_ratio": POSITIVE,
        **dict.fromkeys(("dropout", "attn_dropout", "drop_path"), FRACTION),
    },
    "train": {
        **dict.fromkeys(("epochs", "batch_size", "eval_batch_size"), POSITIVE_INT),
        **dict.fromkeys(("lr", "weight_decay", "warmup_epochs", "min_lr"), NON_NEGATIVE),
        "label_smoothing": FRACTION,
        "betas": (lambda v: isinstance(v, tuple | list) and len(v) == 2
                  and all(FRACTION[0](b) for b in v), "two numbers in [0, 1)"),
        "grad_clip": (lambda v: v is None or POSITIVE[0](v), "null or a number > 0"),
        "device": (lambda v: isinstance(v, str) and DEVICE_PATTERN.fullmatch(v)
                   is not None, "auto, cpu, cuda or cuda:N"),
    },
}


def check_values(section: str, values: Mapping[str, Any]) -> None:
    """Raise a one-line ConfigError naming the first key of ``section`` outside its range."""
    for key, (ok, expected) in RULES.get(section, {}).items():
        if key in values and not ok(values[key]):
            raise ConfigError(f"{section}.{key}={values[key]!r}: expected {expected}")


@dataclass
class TrainConfig:
    """The ``train:`` section."""

    epochs: int = 100
    batch_size: int = 128  # global batch: split across processes under torchrun
    optimizer: str = "adam"  # adam | adamw (adamw: no decay on norms, biases, embeddings)
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "constant"  # constant | cosine (per step, after warmup)
    warmup_epochs: float = 0.0  # linear warmup from lr/100, per step
    min_lr: float = 0.0  # cosine floor
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # max global gradient norm; null = off
    seed: int = 0  # model init, batch order, augmentation, dropout
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 (autocast; BitLinear then uses its fake-quant path)
    compile: bool = False  # torch.compile the model
    eval_batch_size: int = 500
    init_from: str | None = None  # a checkpoint (full precision) to initialise the weights from

    def __post_init__(self) -> None:
        choices = {"optimizer": ("adam", "adamw"), "schedule": ("constant", "cosine"),
                   "precision": ("fp32", "bf16")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ConfigError(f"train.{key}={getattr(self, key)!r}: expected one of "
                                  f"{', '.join(valid)}")
        check_values("train", dataclasses.asdict(self))


@dataclass
class Config:
    model: ViTConfig = field(default_factory=ViTConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        # The model section's dataclass lives in model.py; its ranges are checked here.
        check_values("model", dataclasses.asdict(self.model))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = {}
        for f in dataclasses.fields(self):
            section = dataclasses.asdict(getattr(self, f.name))
            out[f.name] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> Config:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping with sections {_names(cls)}")
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"{source}: unknown section {sorted(unknown, key=str)[0]!r}; "
                              f"valid sections: {_names(cls)}")
        sections = {}
        for f in dataclasses.fields(cls):
            section_cls = _field_type(cls, f.name)
            values = raw.get(f.name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section {f.name!r} must be a mapping")
            sections[f.name] = _build(section_cls, values, f.name, source)
        return cls(**sections)


def _names(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check a YAML value against a dataclass field's type; ints may stand for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                pass
        raise ConfigError(f"{source}: {key}={value!r} is not a valid {_type_name(tp)}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: {key}={value!r}: expected a list")
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(v, inner, key, source) for v in value)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{source}: {key}={value!r}: expected {_type_name(tp)}")


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build(section_cls: type, values: dict[str, Any], section: str, source: str) -> Any:
    hints = typing.get_type_hints(section_cls)
    valid = [f.name for f in dataclasses.fields(section_cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in valid:
            raise ConfigError(f"{source}: unknown key {section}.{key}; valid keys in {section}: "
                              f"{', '.join(valid)}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}", source)
    try:
        # Before construction: a dataclass's own checks may divide by these values.
        check_values(section, kwargs)
        return section_cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config mapping."""
    # Sections that are not mappings are kept as they are, for Config.from_dict to name.
    raw = {k: {} if v is None else dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        values = raw.setdefault(section, {})
        if isinstance(values, dict):
            values[name] = _override_value(key, value)
    return raw


def _override_value(key: str, value: str) -> Any:
    """An override's value parsed as YAML (safe: tags such as !!python/... are refused)."""
    if not value:
        return None
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}={value!r}: not a valid YAML value "
                          f"({_yaml_reason(e)})") from None


def _yaml_reason(e: yaml.YAMLError) -> str:
    """The first line of a YAML error, without PyYAML's multi-line context."""
    problem = getattr(e, "problem", None)
    return " ".join(str(problem or e).split()) or type(e).__name__


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml_mapping(path, "config file", f"sections {_names(Config)}", ConfigError)
    return Config.from_dict(apply_overrides(raw, overrides or []), str(path or "config"))


def read_yaml_mapping(path: str | Path, what: str, expected: str,
                      error: type[ValueError] = ConfigError) -> dict[str, Any]:
    """A YAML file holding a mapping, or ``error`` with one line naming the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder; expected a YAML {what}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file; expected a YAML {what}") from None
    except OSError as e:  # unreadable: permissions, a device, ...
        raise error(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a mapping with {expected}")
    return raw


def save_config(config: Config, path: str | Path) -> None:
    """Write the config as YAML, atomically (a resumed run rewrites its config.yaml)."""
    from bitvit.rundir import write_text

    write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
