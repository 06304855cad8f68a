"""What `bitvit profile` profiles, loaded: a YAML config (fresh weights), a training checkpoint or
run folder (optionally quantized after training), or an exported model (its packed codes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bitvit.deploy.profile import TERNARY_PACKINGS
from bitvit.files import parse_json
from bitvit.nn.methods import DEFAULT_METHOD, FULL_PRECISION
from bitvit.nn.quant import QuantConfig
from bitvit.training.config import Config


class ProfileError(ValueError):
    """A source that cannot be profiled; the message is one line naming it."""


@dataclass
class ProfileSource:
    """What `profile_model` needs, loaded from a config, a checkpoint or an export."""

    model: nn.Module
    config: Config
    weights_source: str  # where the weights (and so the zero counts) come from
    ternary_packing: str | None = None  # the file's packing, for an exported model
    float_dtype: str | None = None  # the file's float tensors (fp16/fp32), for an exported model
    engine: str | None = None  # for an exported model: the engine bitvit.load's auto picks...
    engine_reason: str = ""  # ...and why


def load_for_profile(
    path: str | Path,
    overrides: list[str] | None = None,
    quant: str | None = None,
    where: str | None = None,
    act_bits: str | None = None,
    best: bool = False,
) -> ProfileSource:
    """Load a YAML config, a run or checkpoint folder, a checkpoint file or an exported model.

    A config gives a freshly initialised model (seeded with ``train.seed``); ``quant``, ``where``
    and ``act_bits`` override its quant section. A full-precision checkpoint may be quantized
    after the fact with them, to see what post-training quantization would give.
    """
    from bitvit.deploy.export import is_export
    from bitvit.nn.methods import ACT_BITS_NAMES
    from bitvit.nn.quant import quantize_
    from bitvit.training.checkpoint import CheckpointError, build_model, load_checkpoint
    from bitvit.training.config import load_config
    from bitvit.training.memory import check_inference_fits

    p = Path(path)
    flags = {"method": quant, "where": where, "act_bits": act_bits}
    if best and (p.suffix.lower() in (".yaml", ".yml") or is_export(p)):
        raise ProfileError(f"{p}: --best applies to run folders (their best/ checkpoint)")
    if p.suffix.lower() in (".yaml", ".yml"):
        quant_overrides = [(f"quant.{k}", ACT_BITS_NAMES.get(v, v) if k == "act_bits" else v)
                           for k, v in flags.items() if v is not None]
        config = load_config(p, [*(overrides or []), *quant_overrides])
        check_inference_fits(config, str(p))  # before building: refused at once, not allocated
        torch.manual_seed(config.train.seed)
        return ProfileSource(build_model(config), config,
                             f"freshly initialised weights (train.seed={config.train.seed}); "
                             "a trained model's zeros differ")
    if overrides:
        raise ProfileError(f"{p}: section.key=value overrides apply to YAML configs only")
    if p.suffix.lower() == ".onnx":
        raise ProfileError(f"{p}: an ONNX graph; profile reads a config, a run folder, a "
                           "checkpoint or a .safetensors export (profile this model's)")
    if is_export(p):
        if any(v is not None for v in flags.values()):
            raise ProfileError(f"{p}: an exported model is already quantized; "
                               "--quant/--where/--act-bits apply to configs and checkpoints")
        return _load_exported(p)
    try:
        ckpt = load_checkpoint(p, best=best)
    except CheckpointError as e:
        raise ProfileError(str(e)) from None
    model, config = ckpt.model, ckpt.config
    if all(v is None for v in flags.values()):
        return ProfileSource(model, config, f"the trained weights in {ckpt.path}")
    if config.quant.method != FULL_PRECISION:
        raise ProfileError(f"{ckpt.path}: already quantized ({config.quant.method}); "
                           "--quant/--where/--act-bits apply to full-precision checkpoints")
    q = config.quant
    method = quant or DEFAULT_METHOD
    act = act_bits if act_bits is not None else "default"
    try:
        quantize_(model, method, where or q.where, act, q.include_patch_embed,
                  sub_norm=q.sub_norm)
    except ValueError as e:
        raise ProfileError(f"{ckpt.path}: {e}") from None
    config.quant = QuantConfig(method, where or q.where, act, q.include_patch_embed, q.sub_norm)
    return ProfileSource(model, config,
                         f"the trained weights in {ckpt.path}, quantized after training")


def _load_exported(path: Path) -> ProfileSource:
    """An exported model: its packed codes, unpacked by `bitvit.deploy.export.load` on the int
    engine (whose resident bytes the profile counts), and the engine auto would run it with."""
    from bitvit.deploy.auto import choose_engine
    from bitvit.deploy.export import load, read_export_metadata

    try:
        loaded = load(path, engine="int")
        choice = choose_engine(path)
    except ValueError as e:
        raise ProfileError(str(e)) from None
    meta = read_export_metadata(path)  # already checked by load
    packings = {layer.get("packing") for layer in parse_json(meta["layers"]).values()}
    ternary = sorted(packings & set(TERNARY_PACKINGS))
    # The inference layers keep in/out_features, method, act_bits and their int8 codes.
    return ProfileSource(loaded.vit, loaded.config, f"the exported codes in {path}",
                         ternary[0] if ternary else None, meta["float_dtype"], choice.name,
                         choice.reason)
