"""Model checkpoints: one self-describing safetensors file (weights + config + class names).

A training run writes ``RUN/last/model.safetensors`` (and ``RUN/best/`` with a validation split);
`load_checkpoint` takes a run folder, a checkpoint folder or the file itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bitvit.config import Config, ConfigError
from bitvit.model import VisionTransformer
from bitvit.quant import quantize_

CHECKPOINT_FORMAT = "bitvit-checkpoint"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"  # optimizer, scheduler, RNG and epoch, beside MODEL_FILE


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched checkpoint; the message is one line naming the file."""

    def __init__(self, message: str) -> None:
        # One line even when a library's multi-line message is embedded.
        super().__init__(" ".join(str(message).split()))


def error_reason(e: BaseException, limit: int = 160) -> str:
    """A short one-line reason from a library exception (torch.load's are paragraphs long)."""
    text = str(e)
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        return _unpickler_reason(text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[0] if lines else type(e).__name__
    return reason if len(reason) <= limit else reason[:limit - 3] + "..."


def _unpickler_reason(text: str) -> str:
    """Why torch.load(weights_only=True) refused a file. Its message suggests loading with
    weights_only=False, which would run whatever code the file holds: never pass that on."""
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:
        return (f"torch's safe loader refuses the global {refused.group(1)}: the file holds "
                "objects or code beyond tensors and plain data; not loaded")
    cause = text.split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in cause.splitlines() if line.strip()
             and "weights_only" not in line and not line.startswith("Check the documentation")]
    detail = f" ({lines[0][:80]})" if lines else ""
    return f"torch's safe loader refuses its contents{detail}; not loaded"


def displaced(folder: Path) -> Path:
    """Where `last/` waits while its replacement is renamed into place (see train._atomic_dir).

    A process killed between the two renames leaves only this folder; readers fall back to it.
    """
    return folder.with_name(f".{folder.name}.old")


def checkpoint_folder(folder: Path) -> Path:
    """``folder``, or the complete previous folder that a kill between the two renames of
    `train._atomic_dir` leaves under its `displaced` name. Read only: the next save replaces
    both."""
    old = displaced(folder)
    if not folder.exists() and all((old / f).is_file() for f in (MODEL_FILE, STATE_FILE)):
        return old
    return folder


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
