"""Configs as plain data: four sections (model, quant, data, train), YAML files, CLI overrides.

Each section's dataclass lives beside the code that uses it; this module only composes them,
reads and writes YAML, and applies ``section.key=value`` overrides. A section may nest another
(``train.distill``): a field whose type is a dataclass is a mapping in YAML, and its keys are
overridden as ``section.sub.key=value``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bitvit import files
from bitvit.data import DataConfig, check_normalization
from bitvit.files import YamlRefused, load_yaml, yaml_reason
from bitvit.nn.methods import ACT_BITS_NAMES, METHOD_TABLE, WHERE_NAMES
from bitvit.nn.model import ViTConfig
from bitvit.nn.quant import QuantConfig

if typing.TYPE_CHECKING:
    import torch


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line naming it."""


# A user's value in a message: a 1 MiB string, or a list nested a hundred deep, must not make a
# megabyte-long line (or, shared through aliases, a gigabyte-long one).
MAX_SHOWN = 100  # characters
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 4, MAX_SHOWN, MAX_SHOWN, MAX_SHOWN
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 8


def short_repr(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` for a one-line message, cut to about ``limit`` characters."""
    return _cut(_REPR.repr(value), limit)


def _cut(text: str, limit: int = MAX_SHOWN) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
COUNT: Rule = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
               "an integer >= 0")
LIMIT: Rule = (lambda v: v is None or POSITIVE_INT[0](v), "null or an integer >= 1")
UNIT: Rule = (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")
# Floats that multiply sizes (the MLP's width, warmup steps): huge ones overflow int() or the
# memory estimate. The expected texts keep the older "> 0" / ">= 0" first.
MAX_MLP_RATIO = 64
MAX_WARMUP_EPOCHS = 1_000_000
# Likewise sizes beyond any machine (10**400) overflow the float of the memory estimate's
# message; 10**12 is past every memory, so the estimate still refuses what cannot fit.
MAX_SIZE = 10**12
SIZE: Rule = (lambda v: POSITIVE_INT[0](v) and v <= MAX_SIZE, "an integer >= 1 and <= 10**12")
# Blocks are Python objects before they are tensors: a few bytes of export metadata claiming
# depth 100000 would build for minutes however small its dim. ViTs in use have at most ~50.
MAX_DEPTH = 1000
DEPTH: Rule = (lambda v: POSITIVE_INT[0](v) and v <= MAX_DEPTH,
               f"an integer >= 1 and <= {MAX_DEPTH}")
MLP_RATIO: Rule = (lambda v: _number(v) and 0 < v <= MAX_MLP_RATIO,
                   f"a number > 0 and <= {MAX_MLP_RATIO}")
WARMUP: Rule = (lambda v: _number(v) and 0 <= v <= MAX_WARMUP_EPOCHS,
                f"a number >= 0 and <= {MAX_WARMUP_EPOCHS}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
SEED: Rule = (lambda v: COUNT[0](v) and v < 2**63, "an integer >= 0 and < 2**63")  # torch's


def _one_of(values: Iterable[Any]) -> Rule:
    values = tuple(values)
    return (lambda v: isinstance(v, str | int | type(None)) and not isinstance(v, bool)
            and v in values,
            "one of " + ", ".join("null" if v is None else str(v) for v in values))


RULES: dict[str, dict[str, Rule]] = {
    "model": {
        **dict.fromkeys(("image_size", "in_channels", "patch_size", "dim", "heads",
                         "num_classes"), SIZE),
        "depth": DEPTH,
        "mlp_ratio": MLP_RATIO,
        "norm_eps": POSITIVE,
        **dict.fromkeys(("dropout", "attn_dropout", "drop_path"), FRACTION),
        **{key: _one_of(values) for key, values in ViTConfig.CHOICES.items()},
    },
    "quant": {
        "method": _one_of(("fp", *METHOD_TABLE)),
        "where": _one_of(WHERE_NAMES),
        # 8, 1 or null; 'default' (the method's), 'none', '8', '1' as older config.yaml say
        "act_bits": (_one_of((8, 1, None, *ACT_BITS_NAMES))[0], "8, 1, null, none or default"),
    },
    "data": {
        **dict.fromkeys(("val_size", "crop_padding"), COUNT),
        "seed": SEED,
        **dict.fromkeys(("limit_train", "limit_test"), LIMIT),
        "download_md5": (lambda v: v is None or (isinstance(v, str) and re.fullmatch(
            "[0-9a-fA-F]{32}", v) is not None), "null or 32 hex digits"),
    },
    "train": {
        "epochs": POSITIVE_INT,
        "seed": SEED,
        **dict.fromkeys(("batch_size", "eval_batch_size"), SIZE),
        **dict.fromkeys(("lr", "weight_decay", "min_lr"), NON_NEGATIVE),
        "warmup_epochs": WARMUP,
        "label_smoothing": FRACTION,
        "betas": (lambda v: isinstance(v, tuple | list) and len(v) == 2
                  and all(FRACTION[0](b) for b in v), "two numbers in [0, 1)"),
        "grad_clip": (lambda v: v is None or POSITIVE[0](v), "null or a number > 0"),
        "device": (lambda v: isinstance(v, str) and DEVICE_PATTERN.fullmatch(v)
                   is not None, "auto, cpu, cuda or cuda:N"),
    },
    "train.distill": {
        "kind": _one_of(("soft", "hard")),
        "alpha": UNIT,
        "temperature": POSITIVE,
        "teacher_sha256": (lambda v: v is None or (isinstance(v, str)
                                                   and SHA256_PATTERN.fullmatch(v) is not None),
                           "null or 64 lowercase hex digits"),
        "teacher_test_acc": (lambda v: v is None or UNIT[0](v), "null or a number in [0, 1]"),
    },
}


def check_values(section: str, values: Mapping[str, Any]) -> None:
    """Raise a one-line ConfigError naming the first key of ``section`` outside its range."""
    for key, (ok, expected) in RULES.get(section, {}).items():
        if key in values and not ok(values[key]):
            raise ConfigError(f"{section}.{key}={short_repr(values[key])}: expected {expected}")


@dataclass
class DistillConfig:
    """The ``train.distill:`` section: knowledge distillation from a teacher model, off while
    ``teacher`` is null (`bitvit.training.distill` and the losses in `bitvit.training.losses`).
    """

    teacher: str | None = None  # a run folder, checkpoint folder or file, or exported model
    kind: str = "soft"  # soft (Hinton: KL at a temperature) | hard (DeiT: the teacher's argmax)
    alpha: float = 0.5  # weight of the teacher's term; 1 - alpha weighs the labels' CE
    temperature: float = 4.0  # soft only: both softmaxes at logits / temperature
    # Written by the run when it starts (config.yaml), so that a resume finds the same teacher:
    # a given sha256 must be the teacher file's, and a given test accuracy is not measured again.
    teacher_sha256: str | None = None
    teacher_test_acc: float | None = None  # the teacher on the student's test split

    def __post_init__(self) -> None:
        check_values("train.distill", dataclasses.asdict(self))


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
    # A pretrained model to start from: a bitvit checkpoint (full precision, say), a Hugging
    # Face ViT/DeiT folder or a timm .safetensors file; its architecture is the run's
    # (bitvit.training.pretrained).
    init_from: str | None = None
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        choices = {"optimizer": ("adam", "adamw"), "schedule": ("constant", "cosine"),
                   "precision": ("fp32", "bf16")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ConfigError(f"train.{key}={short_repr(getattr(self, key))}: expected one of "
                                  f"{', '.join(valid)}")
        check_values("train", dataclasses.asdict(self))
        if self.min_lr > self.lr:  # the cosine's floor: above the rate, it would raise it
            raise ConfigError(f"train.min_lr={self.min_lr:g}: expected at most train.lr="
                              f"{self.lr:g}")


@dataclass
class Config:
    model: ViTConfig = field(default_factory=ViTConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        # The model, quant and data sections' dataclasses live beside their code (torch-side);
        # their ranges are checked here, so that a bad value fails when the config loads.
        for section in ("model", "quant", "data"):
            check_values(section, dataclasses.asdict(getattr(self, section)))
        try:
            check_normalization(self.data.mean, self.data.std, self.model.in_channels)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if int(self.model.dim * self.model.mlp_ratio) < 1:  # the MLP's width, as the model takes it
            raise ConfigError(f"model.mlp_ratio={self.model.mlp_ratio:g}: the MLP would be "
                              f"int(model.dim * mlp_ratio) = 0 wide; expected at least "
                              f"{1 / self.model.dim:g} for model.dim={self.model.dim}")
        if self.data.crop_padding > self.model.image_size:  # pads every batch: squares its size
            raise ConfigError(f"data.crop_padding={self.data.crop_padding}: expected at most "
                              f"model.image_size={self.model.image_size}")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = {}
        for f in dataclasses.fields(self):
            section = dataclasses.asdict(getattr(self, f.name))
            out[f.name] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
        defaults = ViTConfig()
        for key in ViTConfig.WRITTEN_IF_SET:  # see ViTConfig: older configs stay as written
            if out["model"][key] == getattr(defaults, key):
                del out["model"][key]
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> Config:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping with sections {_names(cls)}")
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            first = short_repr(sorted(unknown, key=str)[0])
            raise ConfigError(f"{source}: unknown section {first}; valid sections: {_names(cls)}")
        sections = {}
        for f in dataclasses.fields(cls):
            section_cls = _field_type(cls, f.name)
            values = raw.get(f.name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section {f.name!r} must be a mapping")
            sections[f.name] = _build(section_cls, values, f.name, source)
        try:
            return cls(**sections)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def _names(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


# Exponent floats without a dot (1e-6, 3E+4), which PyYAML's YAML 1.1 leaves as strings.
YAML11_FLOAT = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check a YAML value against a dataclass field's type; ints may stand for floats; a nested
    section (a dataclass) is built from its mapping (null: its defaults)."""
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}={short_repr(value)}: expected a mapping with keys "
                              f"{_names(tp)}")
        return _build(tp, value, key, source)
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
        raise ConfigError(f"{source}: {key}={short_repr(value)} is not a valid {_type_name(tp)}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: {key}={short_repr(value)}: expected a list")
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(v, inner, key, source) for v in value)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer past float's range (1 and 400 zeros)
            raise ConfigError(f"{source}: {key}={short_repr(value)} is too large for a "
                              "float") from None
    if tp is float and isinstance(value, str) and YAML11_FLOAT.fullmatch(value):
        return float(value)  # 1e-6: a number, though YAML 1.1 (PyYAML) reads it as a string
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{source}: {key}={short_repr(value)}: expected {_type_name(tp)}")


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def typed_value(section: str, key: str, value: Any, source: str = "config") -> Any:
    """``section.key``'s value checked and typed as `Config.from_dict` would (1e-6 a float,
    2 a float where the field is one); a one-line ConfigError for an unknown key or a wrong
    type. Ranges are checked when the whole config is built."""
    if section not in {f.name for f in dataclasses.fields(Config)}:
        raise ConfigError(f"{source}: unknown section {short_repr(section)}; valid sections: "
                          f"{_names(Config)}")
    section_cls = _field_type(Config, section)
    hints = typing.get_type_hints(section_cls)
    valid = [f.name for f in dataclasses.fields(section_cls)]
    if key not in valid:
        raise ConfigError(f"{source}: unknown key {section}.{_cut(str(key))}; valid keys in "
                          f"{section}: {', '.join(valid)}")
    return _coerce(value, hints[key], f"{section}.{key}", source)


def _build(section_cls: type, values: dict[str, Any], section: str, source: str) -> Any:
    hints = typing.get_type_hints(section_cls)
    valid = [f.name for f in dataclasses.fields(section_cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in valid:
            raise ConfigError(f"{source}: unknown key {section}.{_cut(str(key))}; valid keys in "
                              f"{section}: {', '.join(valid)}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}", source)
    try:
        # Before construction: a dataclass's own checks may divide by these values.
        check_values(section, kwargs)
        return section_cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


Override = str | tuple[str, Any]  # "section.key=value" (YAML value), or (section.key, value)


def apply_overrides(raw: dict[str, Any], overrides: Iterable[Override]) -> dict[str, Any]:
    """Apply overrides in order to a raw config mapping: ``section.key=value`` strings (values
    parsed as YAML) or ``(section.key, value)`` pairs, whose values are taken as they are (the
    command line's typed options). A key of a nested section is ``section.sub.key``."""
    # Sections that are not mappings are kept as they are, for Config.from_dict to name.
    raw = {k: {} if v is None else dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        if isinstance(item, tuple):
            key, value, sep = item[0], item[1], "="
        else:
            key, sep, text = item.partition("=")
        path = key.split(".")
        if not sep or len(path) < 2 or not all(path):
            raise ConfigError(f"override {short_repr(item)}: expected section.key=value")
        if not isinstance(item, tuple):
            value = _override_value(key, text)
        values = raw.setdefault(path[0], {})
        # Into nested sections, each copied so that the caller's mappings stay as given.
        for depth, name in enumerate(path[1:-1], 2):
            if not isinstance(values, dict):
                break
            inner = values.get(name)
            if inner is not None and not isinstance(inner, dict):
                raise ConfigError(f"override {short_repr(item)}: {'.'.join(path[:depth])} "
                                  "is not a section")
            values[name] = values = dict(inner or {})
        if isinstance(values, dict):
            values[path[-1]] = value
    return raw


def override_key(item: Override) -> str:
    """``section.key`` of an override."""
    return item[0] if isinstance(item, tuple) else item.partition("=")[0]


def _override_value(key: str, value: str) -> Any:
    """An override's value parsed as YAML (`load_yaml`: tags such as !!python/... refused)."""
    if not value:
        return None
    try:
        return load_yaml(value)
    except YamlRefused as e:
        raise ConfigError(f"override {_cut(key)}={short_repr(value)}: {e}") from None
    except RecursionError:
        raise ConfigError(f"override {_cut(key)}={short_repr(value)}: nested too deeply") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {_cut(key)}={short_repr(value)}: not a valid YAML value "
                          f"({yaml_reason(e)})") from None


def load_config(path: str | Path | None = None,
                overrides: Iterable[Override] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides (see
    `apply_overrides`). Every key is checked here: a bad value is a one-line ConfigError."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml_mapping(path, "config file", f"sections {_names(Config)}", ConfigError)
    return config_with_overrides(raw, list(overrides or []), str(path or "config"))


def config_with_overrides(raw: dict[str, Any], overrides: list[Override], source: str) -> Config:
    """``Config.from_dict`` of ``raw`` (read from ``source``) with the overrides applied. An
    error an override causes names it, not the file: its value is wrong, or ``raw`` alone is a
    valid config (then the file and the overrides together)."""
    try:
        return Config.from_dict(apply_overrides(raw, overrides), source)
    except ConfigError as e:
        reason = str(e).removeprefix(f"{source}: ")
        if not overrides or reason == str(e):
            raise
        if any(re.match(rf"(unknown key )?{re.escape(override_key(item))}[=;]", reason)
               for item in overrides):
            raise ConfigError(f"override {reason}") from None
        try:
            Config.from_dict(apply_overrides(raw, []), source)
        except ConfigError:
            raise e from None
        raise ConfigError(f"{source} with the overrides: {reason}") from None


def read_yaml_mapping(path: str | Path, what: str, expected: str,
                      error: type[ValueError] = ConfigError) -> dict[str, Any]:
    """A YAML file holding a mapping, or ``error`` with one line naming the file: a missing,
    unreadable, oversized (`files.MAX_TEXT_BYTES`), special (/dev/zero), empty or malformed file,
    or one that holds something else than a mapping."""
    path = Path(path)
    try:
        raw = load_yaml(files.read_limited(path, f"YAML {what}").decode())
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder; expected a YAML {what}") from None
    except files.FileRefused as e:
        raise error(str(e)) from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file; expected a YAML {what}") from None
    except OSError as e:  # unreadable: permissions, a device, ...
        raise error(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    except YamlRefused as e:
        raise error(f"{path}: {e}") from None
    except RecursionError:  # MAX_YAML_DEPTH stops it first, unless the stack is deep already
        raise error(f"{path}: nested too deeply; expected a YAML {what}") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({_cut(str(e).splitlines()[0])})") from None
    if raw is None:  # no document at all: empty, or only comments
        raise error(f"{path}: empty {what}; expected a mapping with {expected}")
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a mapping with {expected}")
    return raw


def resolve_device(name: str, key: str = "--device") -> torch.device:
    """auto (cuda if available), cpu, cuda or cuda:N; a one-line ConfigError naming ``key`` for
    anything else or for a CUDA device this machine does not have."""
    import torch

    if DEVICE_PATTERN.fullmatch(name) is None:
        raise ConfigError(f"{key}={short_repr(name)}: expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{key}={name!r}: CUDA is not available on this machine (torch "
                              f"{torch.__version__}); use auto or cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{key}={name!r}: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
    return device


def save_config(config: Config, path: str | Path) -> None:
    """Write the config as YAML, atomically (a resumed run rewrites its config.yaml)."""
    files.write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


# What a resume may change: where things are and how fast they run, and the epochs (to extend
# a run). The run fills in the rest of these itself (data statistics, the teacher's sha256 and
# accuracy), so a config that leaves them open (auto, null) asks for nothing.
RESUME_MAY_CHANGE = frozenset({
    "train.epochs", "train.device", "train.compile", "train.eval_batch_size", "data.path",
    "data.cache_dir", "data.download", "data.download_url", "data.download_md5",
    "train.distill.teacher"})
RUN_FILLS_IN = frozenset({"data.mean", "data.std", "train.distill.teacher_sha256",
                          "train.distill.teacher_test_acc"})


def flat_keys(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{section: {key: value, sub: {key: value}}} -> {section.key: value, section.sub.key: ...}
    (tuples as lists, as YAML gives them)."""
    flat: dict[str, Any] = {}
    for k, v in mapping.items():
        if isinstance(v, Mapping):
            flat |= flat_keys(v, f"{prefix}{k}.")
        else:
            flat[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return flat


def checked_resume_config(saved: Config, asked: Config, run_dir: str | Path) -> Config:
    """Refuse a resume asking for a setting the run did not train with: it would continue
    under the new one and write it into config.yaml as if the whole run had had it. Returns
    the config to go on under: the one asked, with what the run filled in where it leaves
    them open (so a swapped teacher is still checked against the sha256 the run recorded)."""
    old, new = flat_keys(saved.to_dict()), flat_keys(asked.to_dict())
    for key in sorted(old.keys() | new.keys()):
        if key in RESUME_MAY_CHANGE or (key in RUN_FILLS_IN and new.get(key) in (None, "auto")):
            continue
        if old.get(key) != new.get(key):
            raise ConfigError(
                f"{run_dir}: the run trained with {key}={short_repr(old.get(key))} but the resume "
                f"asks {key}={short_repr(new.get(key))}; a resume continues the run as it was "
                "(it may change only train.epochs, the device, compile, the eval batch size and "
                "where the data and teacher are): pass its saved config "
                "(bitvit.load_config(RUN/config.yaml)) or train a new run")
    raw = asked.to_dict()
    for key in RUN_FILLS_IN:
        if new.get(key) in (None, "auto"):
            *sections, name = key.split(".")
            inner = raw
            for section in sections:
                inner = inner[section]
            inner[name] = old.get(key)
    return Config.from_dict(raw, str(run_dir))
