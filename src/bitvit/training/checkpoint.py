"""Model checkpoints: one self-describing safetensors file (weights + config + class names).

A training run writes ``RUN/last/model.safetensors`` (and ``RUN/best/`` with a validation split);
`load_checkpoint` takes a run folder, a checkpoint folder or the file itself.
"""

from __future__ import annotations

import json
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
from bitvit.training.config import Config, ConfigError
from bitvit.training.rundir import MODEL_FILE, STATE_FILE, checkpoint_folder, displaced  # noqa: F401

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
    """A run folder, a checkpoint folder or a model file -> the model.safetensors file."""
    p = Path(path)
    if p.is_dir():
        sub = "best" if best else "last"
        for candidate in (checkpoint_folder(p / sub) / MODEL_FILE, p / MODEL_FILE):
            if candidate.is_file():
                return candidate
        hint = " (best/ exists only for runs with a validation split)" if best else ""
        raise CheckpointError(f"{p}: no {sub}/{MODEL_FILE} in this folder{hint}")
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file or run folder")
    return p


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
    try:
        config = Config.from_dict(json.loads(meta["config"]), source=str(file))
        classes = json.loads(meta["classes"])
    except (KeyError, json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"{file}: bad checkpoint metadata ({error_reason(e)})") from None
    model = build_model(config)
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: corrupt checkpoint ({error_reason(e)})") from None
    load_state(model, state, file)
    return Checkpoint(model.eval(), config, classes, file)


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
    """Write a checkpoint folder: the model file and the training state."""
    files.write_file(folder / MODEL_FILE, lambda p: save_model(p, model, config, classes))
    files.write_file(folder / STATE_FILE, lambda p: _torch_save(state, p))


def _torch_save(obj: Any, path: Path) -> None:
    with path.open("wb") as f:  # through a Python file, a full disk raises OSError (ENOSPC)
        torch.save(obj, f)


def load_training_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: Any) -> tuple[int, float]:
    """Restore model, optimizer, scheduler and RNG from a checkpoint folder; return next epoch
    and the best validation accuracy so far. Bad files give a one-line CheckpointError."""
    folder = checkpoint_folder(folder)
    model_file, state_file = folder / MODEL_FILE, folder / STATE_FILE
    for f in (model_file, state_file):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing; cannot resume (did an epoch complete?)")
    try:
        weights = load_file(str(model_file))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types on corrupt files
        raise CheckpointError(f"{model_file}: corrupt checkpoint, expected safetensors weights "
                              f"written by bitvit train ({error_reason(e)})") from None
    load_state(model, weights, model_file)
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on bad files
        raise CheckpointError(f"{state_file}: unreadable training state, expected a torch.save "
                              f"file written by bitvit train ({error_reason(e)})") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{state_file}: not a bitvit training state: missing "
                              f"{', '.join(missing)} (expected {', '.join(STATE_KEYS)})")
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return int(state["epoch"]) + 1, float(state["best_acc"])
    except Exception as e:  # noqa: BLE001 - wrong types or shapes raise many kinds
        raise CheckpointError(f"{state_file}: training state does not fit this run's model and "
                              f"optimizer ({error_reason(e)})") from None
