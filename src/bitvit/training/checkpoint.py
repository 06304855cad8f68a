"""Model checkpoints: one self-describing safetensors file (weights + config + class names).

A training run writes ``RUN/last/model.safetensors`` (and ``RUN/best/`` with a validation split);
`load_checkpoint` takes a run folder, a checkpoint folder or the file itself.

A checkpoint folder records the sha256 of its files in ``checksums.json``, written into the
folder before `bitvit.training.rundir.swap_folder` renames it into place, so the three arrive
together. Readers verify what they load (`intact_folder`): a folder that fails the check gives
way to its previous copy ``.NAME.old`` when that one is intact (a `bitvit.files.Notice` says so)
and is refused in one line otherwise; nothing is deleted. Folders written before checksums were
recorded load as they did.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from bitvit import files
from bitvit.files import error_reason
from bitvit.nn.model import VisionTransformer
from bitvit.nn.quant import quantize_
from bitvit.system import memory_shortfall
from bitvit.training import memory
from bitvit.training.config import Config, ConfigError, load_config, short_repr
from bitvit.training.rundir import (  # noqa: F401 - checkpoint_folder: read by older callers
    CHECKSUMS,
    CONFIG,
    MODEL_FILE,
    STATE_FILE,
    checkpoint_folder,
    displaced,
)

CHECKPOINT_FORMAT = "bitvit-checkpoint"
STATE_KEYS = ("epoch", "best_acc", "optimizer", "scheduler", "torch_rng")


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched checkpoint; the message is one line naming the file."""

    def __init__(self, message: str) -> None:
        # One line even when a library's multi-line message is embedded.
        super().__init__(" ".join(str(message).split()))


@dataclass
class Checkpoint:
    model: VisionTransformer  # quantized as its config says, latent weights, eval mode, on CPU
    config: Config
    classes: list[str]
    path: Path  # the model.safetensors file


def build_model(config: Config) -> VisionTransformer:
    """The model a config describes, quantized as its ``quant`` section says."""
    model = VisionTransformer(config.model)
    q = config.quant
    quantize_(model, q.method, q.where, q.act_bits, q.include_patch_embed, sub_norm=q.sub_norm)
    return model


def save_model(path: str | Path, model: torch.nn.Module, config: Config,
               classes: list[str]) -> None:
    """Write the model's weights and everything needed to rebuild it to one safetensors file."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": CHECKPOINT_FORMAT, "config": json.dumps(config.to_dict()),
                "classes": json.dumps(classes)}
    save_file(state, str(path), metadata=metadata)


def resolve_checkpoint(path: str | Path, best: bool = False) -> Path:
    """A run folder, a checkpoint folder or a model file -> the model.safetensors file to read,
    verified against its folder's checksums (see `intact_folder`: a corrupt ``last/`` gives way
    to an intact ``.last.old/``)."""
    p = Path(path)
    if p.is_dir():
        sub = "best" if best else "last"
        # --best names a run's best/: a checkpoint folder given with it is not read as the best.
        for folder in (p / sub,) if best else (p / sub, p):
            if any((f / MODEL_FILE).is_file() for f in (folder, displaced(folder))):
                return intact_folder(folder, (MODEL_FILE,)) / MODEL_FILE
        hint = " (best/ exists only for runs with a validation split)" if best else ""
        raise CheckpointError(f"{p}: no {sub}/{MODEL_FILE} in this folder{hint}")
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file or run folder")
    if best:
        raise CheckpointError(f"{p}: a checkpoint file has no best/; best (--best) applies to "
                              "run folders")
    return intact_folder(p.parent, (p.name,)) / p.name


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({error_reason(e)})") from None


def load_checkpoint(path: str | Path, best: bool = False) -> Checkpoint:
    """Rebuild the trained model from a run folder, checkpoint folder or model file."""
    file = resolve_checkpoint(path, best)
    meta = read_metadata(file)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{file}: not a bitvit training checkpoint (format "
                              f"{meta.get('format')!r}; exported models load with bitvit.load)")
    config, classes = _stored(file, meta)
    run_config = Path(path) / CONFIG
    if run_config.is_file():  # a run folder: its checkpoint must be of its config's model
        check_same_model(file, config, load_config(run_config), str(run_config))
    memory.check_inference_fits(config, str(file))
    _check_fits(file)
    model = build_model(config)
    try:
        with files.caught_warnings() as caught:
            state = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: corrupt checkpoint ({error_reason(e)}"
                              f"{files.warning_note(caught)})") from None
    load_state(model, state, file)
    return Checkpoint(model.eval(), config, classes, file)


def check_same_model(file: Path, stored: Config, expected: Config, where: str) -> None:
    """The checkpoint's own config (``stored``, from its metadata) describes the model of
    ``expected`` (a run's config.yaml); `CheckpointError` naming the first differing key."""
    ours, theirs = stored.to_dict(), expected.to_dict()
    for section in ("model", "quant"):
        for key in sorted(set(ours[section]) | set(theirs[section])):
            a, b = ours[section].get(key), theirs[section].get(key)
            if a != b:
                raise CheckpointError(f"{file}: checkpoint is from another model ({section}.{key}"
                                      f"={a!r} in it, {b!r} in {where})")


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], file: Path | str) -> None:
    """load_state_dict with a one-line error when the checkpoint is from another model."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        what = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
                if unexpected else f"{shapes[0]} has shape {tuple(state[shapes[0]].shape)}, "
                f"expected {tuple(own[shapes[0]].shape)}")
        raise CheckpointError(f"{file}: checkpoint is from another model ({what})")
    model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Training checkpoints: weights and the state that continues the run
# ---------------------------------------------------------------------------------------------


def training_state(optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int,
                   best_acc: float) -> dict[str, Any]:
    """What ``state.pt`` holds beside the weights: enough to continue the run exactly."""
    # Built from STATE_KEYS so that what resume checks for is what is written.
    state = dict(zip(STATE_KEYS, (epoch, best_acc, optimizer.state_dict(),
                                  scheduler.state_dict(), torch.get_rng_state()), strict=True))
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def save_training_checkpoint(folder: Path, model: nn.Module, config: Config,
                             classes: list[str], state: dict[str, Any]) -> None:
    """Write a checkpoint folder: the model file, the training state and their checksums."""
    files.write_file(folder / MODEL_FILE, lambda p: save_model(p, model, config, classes))
    files.write_file(folder / STATE_FILE, lambda p: _torch_save(state, p))
    write_checksums(folder, (MODEL_FILE, STATE_FILE))


def _torch_save(obj: Any, path: Path) -> None:
    with path.open("wb") as f:  # through a Python file, a full disk raises OSError (ENOSPC)
        torch.save(obj, f)


def load_training_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: Any, config: Config | None = None,
                        classes: list[str] | None = None) -> tuple[int, float]:
    """Restore model, optimizer, scheduler and RNG from a checkpoint folder (or its intact
    previous copy, see `intact_folder`); return next epoch and the best validation accuracy so
    far. With ``config`` (the run's), the checkpoint must be of its model; with ``classes``
    (the data's), of those classes in that order. Bad files give a one-line CheckpointError."""
    folder = intact_folder(folder, (MODEL_FILE, STATE_FILE), "resume")
    model_file, state_file = folder / MODEL_FILE, folder / STATE_FILE
    _check_fits(model_file)
    try:
        weights = load_file(str(model_file))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types on corrupt files
        raise CheckpointError(f"{model_file}: corrupt checkpoint, expected safetensors weights "
                              f"written by bitvit train ({error_reason(e)})") from None
    stored_config, stored_classes = _stored(model_file, read_metadata(model_file))
    if config is not None:
        check_same_model(model_file, stored_config, config, "the run's config.yaml")
    if classes is not None and list(classes) != stored_classes:
        # Same count, other classes (or order): the head's rows would mean other labels.
        raise CheckpointError(f"{model_file}: trained on the classes {short_repr(stored_classes)}"
                              f" but the data has {short_repr(list(classes))}; resume on the "
                              "run's own data")
    load_state(model, weights, model_file)
    state = _read_state(state_file)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            # As many as are visible now (another CUDA_VISIBLE_DEVICES may show fewer).
            for i, rng in enumerate(state["cuda_rng"][:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(rng, i)
        return int(state["epoch"]) + 1, float(state["best_acc"])
    except Exception as e:  # noqa: BLE001 - wrong types or shapes raise many kinds
        raise CheckpointError(f"{state_file}: training state does not fit this run's model and "
                              f"optimizer ({error_reason(e)})") from None


def _check_fits(file: Path) -> None:
    """Weights and training state are read whole: a file (or a zip's unpacked entries) larger
    than the memory available is refused in one line before it is read."""
    try:
        why = memory_shortfall(files.stored_bytes(file, "bitvit checkpoint file"))
    except files.FileRefused as e:
        raise CheckpointError(str(e)) from None
    if why:
        raise CheckpointError(f"{file}: {why}")


def _stored(model_file: Path, meta: dict[str, str]) -> tuple[Config, list[str]]:
    """The config and class names in a checkpoint's metadata (a one-line CheckpointError if it
    has none)."""
    try:
        config = Config.from_dict(files.parse_json(meta["config"]), source=str(model_file))
        classes = files.parse_json(meta["classes"])
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise ValueError("classes is not a list of names")
    except (KeyError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{model_file}: bad checkpoint metadata "
                              f"({error_reason(e)})") from None
    return config, classes


# torch.save writes a zip archive; a bare pickle stream (pickle.dump, or torch's legacy format,
# which bitvit never wrote) is refused before any unpickler sees it.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # how a pickle of protocol 2 or later begins


def _read_state(state_file: Path) -> dict[str, Any]:
    """state.pt through torch's safe loader (tensors and plain data only, never code); the
    warnings torch raises on a strange file are folded into the one-line error."""
    unreadable = (f"{state_file}: unreadable training state, expected a torch.save file written "
                  "by bitvit train")
    with state_file.open("rb") as f:
        magic = f.read(4)
    if magic != _ZIP_MAGIC:
        what = ": a bare pickle stream" if magic[:1] == _PICKLE_PROTO else ""
        raise CheckpointError(f"{unreadable} (not torch.save's zip archive{what}; not loaded)")
    _check_fits(state_file)
    try:
        with files.caught_warnings() as caught:
            state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on bad files
        raise CheckpointError(f"{unreadable} ({error_reason(e)}"
                              f"{files.warning_note(caught)})") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{state_file}: not a bitvit training state: missing "
                              f"{', '.join(missing)} (expected {', '.join(STATE_KEYS)})")
    return state


# ---------------------------------------------------------------------------------------------
# Checksums: every checkpoint folder records the sha256 of its files
# ---------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder: Path, names: Sequence[str]) -> None:
    """Record the sha256 of ``names`` in ``folder/checksums.json`` (after they are written)."""
    sums = {name: file_sha256(folder / name) for name in names}
    files.write_text(folder / CHECKSUMS, json.dumps({"sha256": sums}, indent=2) + "\n")


def damage(folder: Path, needed: Sequence[str]) -> str | None:
    """Why ``folder`` cannot give the files ``needed`` (one clause naming the file), or None
    when it can: every one present and matching the sha256 in its checksums.json. A folder
    without checksums.json was written before bitvit recorded them and is taken as it is."""
    for name in needed:
        if not (folder / name).is_file():
            return f"{folder / name}: missing"
    sums_file = folder / CHECKSUMS
    if not sums_file.exists():
        return None
    try:
        recorded = files.parse_json(files.read_limited(sums_file, "checksums file"))["sha256"]
        if not isinstance(recorded, dict):
            raise TypeError("sha256 is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{sums_file}: unreadable ({error_reason(e)})"
    for name in needed:
        if name in recorded and file_sha256(folder / name) != recorded[name]:
            return f"{folder / name}: does not match the sha256 recorded in {CHECKSUMS} (corrupt)"
    return None


def intact_folder(folder: Path, needed: Sequence[str], purpose: str = "load") -> Path:
    """``folder``, or its previous copy (`displaced`: ``.NAME.old``) when ``folder`` is missing
    or fails `damage`; a fallback from a folder that exists is said in a `files.Notice`.
    `CheckpointError` (one line) when neither is intact. Reads only: nothing is deleted."""
    old = displaced(folder)
    reasons = []
    for candidate in (folder, old):
        if not candidate.exists():
            continue
        why = damage(candidate, needed)
        if why is None:
            if reasons:
                warnings.warn(files.Notice(f"{reasons[0]}; using {candidate}, the previous "
                                           "checkpoint, instead"), stacklevel=2)
            return candidate
        reasons.append(why)
    if not reasons:
        raise CheckpointError(f"{folder}: missing; cannot {purpose} (did an epoch complete?)")
    other = (f"; the previous checkpoint is no better ({reasons[1]})" if len(reasons) > 1
             else f"; no previous checkpoint {old} to fall back to")
    raise CheckpointError(f"{reasons[0]}{other}; cannot {purpose}")
