"""Pretrained ViT weights from Hugging Face and timm, mapped onto `bitvit.nn.model`'s names.

Read with safetensors and JSON alone (neither transformers nor timm is needed); a
``pytorch_model.bin`` goes through ``torch.load(weights_only=True)``, which unpickles no code.

- A Hugging Face folder: ``config.json`` with ``model_type`` ``vit`` or ``deit``, and
  ``model.safetensors`` (or ``pytorch_model.bin``). The architecture is the config's;
  ``preprocessor_config.json``, when present, gives the model's normalization.
- A timm state dict in a ``.safetensors`` file (timm's names: ``patch_embed.proj``,
  ``blocks.N.attn.qkv``, ``norm``, ``head``...). The architecture is inferred from the shapes,
  except the number of heads, which no shape holds: dim / 64 (timm's ViTs use 64-wide heads),
  marked as a guess (`Pretrained.guessed`) that the caller may replace.

The mapping: the patch convolution's weight (dim, C, p, p) becomes the patch linear layer's
(dim, C * p * p), since `bitvit.nn.model.PatchEmbed` flattens each patch in the same
(channel, row, column) order; Hugging Face's query, key and value are stacked into ``qkv`` in
that order (`bitvit.nn.model.Attention` splits its output so). What bitvit's ViT expresses only
through an option becomes that option (`ARCH_KEYS`): the LayerNorm epsilon (Hugging Face's
``layer_norm_eps``, 1e-12 by default; timm's 1e-6), the final norm (timm's ``fc_norm``: after
pooling), q/k/v biases, the GELU form (``hidden_act``). Anything else is refused with a one-line
`PretrainedError` naming the feature, DeiT's distillation token included.

Layer 1 (`bitvit.nn`): pure mapping. Which architecture, image size and classes a run uses is
`bitvit.training.pretrained`'s decision.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from bitvit import files
from bitvit.files import error_reason
from bitvit.nn.model import VisionTransformer, ViTConfig
from bitvit.system import memory_shortfall

# The ViTConfig keys a pretrained model fixes: its architecture. image_size and num_classes it
# also has, but a run may change them (position embeddings resampled, a new head).
ARCH_KEYS = ("in_channels", "patch_size", "dim", "depth", "heads", "mlp_ratio", "pooling",
             "norm_eps", "final_norm", "qkv_bias", "gelu")
HF_MODEL_TYPES = ("vit", "deit")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # preferred first
HF_GELU = {"gelu": "exact", "gelu_python": "exact", "gelu_new": "tanh",
           "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
# transformers' ViTConfig defaults, for keys a config.json leaves out.
HF_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
               "intermediate_size": 3072, "image_size": 224, "patch_size": 16,
               "num_channels": 3, "layer_norm_eps": 1e-12, "qkv_bias": True,
               "hidden_act": "gelu"}
TIMM_NORM_EPS = 1e-6  # timm's ViT: partial(nn.LayerNorm, eps=1e-6)
TIMM_HEAD_DIM = 64
# Parts of timm ViTs that bitvit's has no counterpart for: a key fragment and the feature.
TIMM_UNSUPPORTED = (
    ("dist_token", "DeiT's distillation token"), ("head_dist", "DeiT's distillation head"),
    ("reg_token", "register tokens"), ("norm_pre", "a norm before the blocks (timm pre_norm)"),
    ("patch_embed.norm", "a norm after the patch embedding"),
    (".ls1.", "layer scale (timm init_values)"), (".ls2.", "layer scale (timm init_values)"),
    ("attn.q_norm", "query/key norms (timm qk_norm)"),
    ("attn.k_norm", "query/key norms (timm qk_norm)"),
    ("attn.norm", "a norm inside attention (timm scale_attn_norm)"),
    ("attn.gate", "gated attention"),
    ("mlp.norm", "a norm inside the MLP (timm scale_mlp_norm)"),
    ("attn_pool", "attention pooling (timm global_pool='map')"),
    ("fc1_g", "a gated MLP (SwiGLU)"), ("fc1_x", "a gated MLP (SwiGLU)"),
)
# Names of bitvit's blocks that timm's use too.
TIMM_BLOCK_KEYS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
# bitvit's block parts -> Hugging Face's (their layer's names, as save_pretrained writes them).
HF_BLOCK_KEYS = (("norm1", "layernorm_before"), ("attn.proj", "attention.output.dense"),
                 ("norm2", "layernorm_after"), ("mlp.fc1", "intermediate.dense"),
                 ("mlp.fc2", "output.dense"))


class PretrainedError(ValueError):
    """A pretrained model that cannot be read or expressed; one line naming the file."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass
class Pretrained:
    """A pretrained model in bitvit's terms."""

    path: Path  # the weights file read
    kind: str  # huggingface | timm
    arch: dict[str, Any]  # ViTConfig keys: ARCH_KEYS, image_size, num_classes (None: no head)
    state: dict[str, torch.Tensor]  # bitvit's names and shapes; no head.* without a classifier
    guessed: frozenset[str] = frozenset()  # arch keys inferred by convention, not read
    mean: tuple[float, ...] | None = None  # the model's normalization, when the source has it
    std: tuple[float, ...] | None = None
    classes: list[str] | None = None  # Hugging Face's id2label


def read_pretrained(path: str | Path) -> Pretrained:
    """A Hugging Face folder or a timm ``.safetensors`` state dict, in bitvit's names."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise PretrainedError(f"{p}: no config.json; expected a Hugging Face model folder")
        return read_huggingface(p)
    if not p.exists():
        raise PretrainedError(f"{p}: no such file or folder")
    if p.suffix != ".safetensors":
        raise PretrainedError(f"{p}: expected a Hugging Face model folder (config.json) or a "
                              "timm state dict in a .safetensors file")
    return read_timm(p)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = files.parse_json(files.read_limited(path, "JSON file"))
    except (OSError, ValueError) as e:  # FileRefused, UnicodeDecodeError, JSONDecodeError
        raise PretrainedError(f"{path}: not a readable JSON file ({error_reason(e)})") from None
    if not isinstance(data, dict):
        raise PretrainedError(f"{path}: expected a JSON object")
    return data


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file through the weights-only loader."""
    if not path.is_file():  # a FIFO would hang the reader, /dev/zero never end
        raise PretrainedError(f"{path}: not a regular file; expected a weights file")
    try:  # read whole: a file larger than the memory (a sparse one, a zip bomb) is refused
        why = memory_shortfall(files.stored_bytes(path))
    except files.FileRefused as e:
        raise PretrainedError(str(e)) from None
    if why:
        raise PretrainedError(f"{path}: {why}")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError) as e:
        raise PretrainedError(f"{path}: not a readable weights file ({error_reason(e)})") from None
    except Exception as e:  # noqa: BLE001 - the unpickler raises many types on foreign files
        raise PretrainedError(f"{path}: not a readable weights file ({error_reason(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise PretrainedError(f"{path}: expected a state dict (names to tensors)")
    return state


def _take(state: dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key not in state:
        raise PretrainedError(f"{path}: missing {key}")
    return state.pop(key)


def _leftover(state: dict[str, torch.Tensor], path: Path) -> None:
    if state:
        key = sorted(state)[0]
        raise PretrainedError(f"{path}: {key}: a part bitvit's ViT has no counterpart for "
                              f"({len(state)} such tensor(s))")


def _patch_linear(weight: torch.Tensor, path: Path, key: str) -> torch.Tensor:
    """The patch convolution (dim, C, p, p) as the linear layer on flattened patches."""
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise PretrainedError(f"{path}: {key} has shape {tuple(weight.shape)}; expected a "
                              "square patch convolution (dim, channels, p, p)")
    return weight.reshape(weight.shape[0], -1)


def mlp_ratio(dim: int, hidden: int) -> float:
    """The ratio whose ``int(dim * ratio)`` (`bitvit.nn.model.Block`) is exactly ``hidden``."""
    ratio = hidden / dim
    while int(dim * ratio) < hidden:  # hidden / dim may round down by an ulp
        ratio = math.nextafter(ratio, math.inf)
    return ratio


# ---------------------------------------------------------------------------------------------
# Hugging Face
# ---------------------------------------------------------------------------------------------


def read_huggingface(folder: Path) -> Pretrained:
    config_path = folder / "config.json"
    cfg = read_json(config_path)
    arch, classes = _hf_arch(config_path, cfg)
    weights = next((folder / n for n in HF_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        sharded = (folder / "model.safetensors.index.json").is_file()
        raise PretrainedError(f"{folder}: no {' or '.join(HF_WEIGHTS)}"
                              + ("; sharded checkpoints are not supported" if sharded else ""))
    raw = read_state(weights)
    prefix = f"{cfg['model_type']}." if any(k.startswith(f"{cfg['model_type']}.")
                                            for k in raw) else ""
    distill = f"{prefix}embeddings.distillation_token"
    if distill in raw:
        raise PretrainedError(
            f"{weights}: {distill}: DeiT's distillation token (a second class token every block "
            "attends to) is not supported by bitvit's ViT (DeiT checkpoints without it are "
            "published as model_type vit, and load)")
    try:  # shapes are read from the tensors: q, k and v of other widths, say, do not stack
        state = _hf_state(weights, raw, prefix, arch)
    except PretrainedError:
        raise
    except (KeyError, IndexError, ValueError, RuntimeError) as e:
        raise PretrainedError(f"{weights}: not a Hugging Face ViT bitvit can read "
                              f"({error_reason(e)})") from None
    # The classifier's size is its weight's (id2label names the classes, when it fits).
    head = state.get("head.weight")
    arch["num_classes"] = None if head is None else head.shape[0]
    if classes is not None and len(classes) != arch["num_classes"]:
        classes = None
    mean, std = _hf_normalization(folder / "preprocessor_config.json", arch["in_channels"])
    checked = check_shapes(weights, state, arch)
    return Pretrained(weights, "huggingface", checked, state, mean=mean, std=std,
                      classes=classes)


def _hf_value(path: Path, cfg: dict[str, Any], key: str, kind: type) -> Any:
    value = cfg.get(key, HF_DEFAULTS[key])
    if (kind in (int, float) and isinstance(value, list) and value
            and all(type(x) is type(value[0]) and x == value[0] for x in value)):
        value = value[0]  # image_size and patch_size may be [h, w]
    ok = (isinstance(value, kind) if kind is not float else isinstance(value, int | float))
    if not ok or isinstance(value, bool) != (kind is bool):
        raise PretrainedError(f"{path}: {key}={files.one_line(repr(value), 80)}: expected "
                              f"{kind.__name__}"
                              + (" (square only)" if isinstance(value, list) else ""))
    if kind is int and value <= 0:  # every size of the architecture: 0 would divide by zero
        raise PretrainedError(f"{path}: {key}={value}: expected a positive int")
    return value


def _hf_arch(path: Path, cfg: dict[str, Any]) -> tuple[dict[str, Any], list[str] | None]:
    """The architecture a Hugging Face config.json describes, in ViTConfig's keys."""
    model_type = cfg.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise PretrainedError(f"{path}: model_type {model_type!r}: expected vit or deit")
    if "DeiTForImageClassificationWithTeacher" in (cfg.get("architectures") or []):
        raise PretrainedError(f"{path}: DeiTForImageClassificationWithTeacher: DeiT's "
                              "distillation token and distillation head are not supported by "
                              "bitvit's ViT")
    v = {key: _hf_value(path, cfg, key, kind) for key, kind in (
        ("hidden_size", int), ("num_hidden_layers", int), ("num_attention_heads", int),
        ("intermediate_size", int), ("image_size", int), ("patch_size", int),
        ("num_channels", int), ("layer_norm_eps", float), ("qkv_bias", bool),
        ("hidden_act", str))}
    if v["hidden_act"] not in HF_GELU:
        raise PretrainedError(f"{path}: hidden_act={v['hidden_act']!r}: bitvit's ViT has GELU "
                              f"({', '.join(HF_GELU)})")
    labels = cfg.get("id2label")
    classes = None
    if isinstance(labels, dict) and all(str(k).isdecimal() for k in labels):  # not "²"
        classes = [str(labels[k]) for k in sorted(labels, key=int)]
    arch = {"image_size": v["image_size"], "in_channels": v["num_channels"],
            "patch_size": v["patch_size"], "dim": v["hidden_size"],
            "depth": v["num_hidden_layers"], "heads": v["num_attention_heads"],
            "mlp_ratio": mlp_ratio(v["hidden_size"], v["intermediate_size"]),
            "num_classes": None, "pooling": "cls",  # the classifier's, once read
            "norm_eps": float(v["layer_norm_eps"]), "final_norm": "tokens",
            "qkv_bias": v["qkv_bias"], "gelu": HF_GELU[v["hidden_act"]]}
    return arch, classes


def _hf_state(path: Path, raw: dict[str, torch.Tensor], prefix: str,
              arch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Hugging Face's ViT/DeiT names -> bitvit's; anything left over is refused."""
    src, out = dict(raw), {}
    emb = f"{prefix}embeddings."
    out["cls_token"] = _take(src, f"{emb}cls_token", path)
    out["pos_embed"] = _take(src, f"{emb}position_embeddings", path)
    key = f"{emb}patch_embeddings.projection.weight"
    out["patch_embed.proj.weight"] = _patch_linear(_take(src, key, path), path, key)
    out["patch_embed.proj.bias"] = _take(src, f"{emb}patch_embeddings.projection.bias", path)
    for i in range(arch["depth"]):
        theirs, ours = f"{prefix}encoder.layer.{i}.", f"blocks.{i}."
        for part, hf in HF_BLOCK_KEYS:
            for t in ("weight", "bias"):
                out[f"{ours}{part}.{t}"] = _take(src, f"{theirs}{hf}.{t}", path)
        qkv = f"{theirs}attention.attention."
        for t in ("weight", "bias") if arch["qkv_bias"] else ("weight",):
            out[f"{ours}attn.qkv.{t}"] = torch.cat(
                [_take(src, f"{qkv}{n}.{t}", path) for n in ("query", "key", "value")])
    for t in ("weight", "bias"):
        out[f"norm.{t}"] = _take(src, f"{prefix}layernorm.{t}", path)
        if f"classifier.{t}" in src:
            out[f"head.{t}"] = src.pop(f"classifier.{t}")
    # Unused by a classifier: ViTModel's pooler (dense + tanh), masked image modelling's token.
    for k in [k for k in src if k.startswith(f"{prefix}pooler.") or k == f"{emb}mask_token"]:
        del src[k]
    _leftover(src, path)
    return out


def _hf_normalization(path: Path, channels: int
                      ) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """preprocessor_config.json's normalization as bitvit's: on pixels / 255."""
    if not path.is_file():
        return None, None
    cfg = read_json(path)
    if cfg.get("do_normalize", True) is False:
        mean, std = [0.0] * channels, [1.0] * channels
    else:
        mean, std = cfg.get("image_mean"), cfg.get("image_std")
    values = []
    for key, v in (("image_mean", mean), ("image_std", std)):
        v = [v] * channels if isinstance(v, int | float) and not isinstance(v, bool) else v
        if not (isinstance(v, list) and len(v) == channels and all(
                isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
                for x in v)) or (key == "image_std" and min(v) <= 0):
            raise PretrainedError(f"{path}: {key}={v!r}: expected {channels} finite number(s)"
                                  + (" > 0" if key == "image_std" else ""))
        values.append(v)
    # Hugging Face scales pixels by rescale_factor (1/255), bitvit by 1/255: (x * r - m) / s
    # is (x / 255 - m / (255 r)) / (s / (255 r)).
    rescale = cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else 1.0
    if not isinstance(rescale, int | float) or isinstance(rescale, bool) or rescale <= 0:
        raise PretrainedError(f"{path}: rescale_factor={rescale!r}: expected a number > 0")
    factor = 255.0 * rescale
    mean, std = (tuple(float(x) / factor for x in v) for v in values)
    return mean, std


# ---------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------


def read_timm(path: Path) -> Pretrained:
    raw = read_state(path)
    if any("embeddings.patch_embeddings" in k for k in raw):
        raise PretrainedError(f"{path}: Hugging Face names (embeddings.patch_embeddings...): "
                              "pass the folder that holds it and its config.json")
    for key in sorted(raw):
        for fragment, feature in TIMM_UNSUPPORTED:
            if fragment in key:
                raise PretrainedError(f"{path}: {key}: {feature} is not supported by bitvit's "
                                      "ViT")
    src, out = dict(raw), {}
    key = "patch_embed.proj.weight"
    try:  # shapes are read from the tensors: a hand-made file may have any (0, 1-D, missing)
        arch = _timm_arch(path, raw)
        out[key] = _patch_linear(_take(src, key, path), path, key)
    except PretrainedError:
        raise
    except (KeyError, IndexError, ValueError, RuntimeError, ZeroDivisionError) as e:
        raise PretrainedError(f"{path}: not a timm ViT state dict bitvit can read "
                              f"({error_reason(e)})") from None
    for key in ("patch_embed.proj.bias", "pos_embed"):
        out[key] = _take(src, key, path)
    if arch["pooling"] == "cls":
        out["cls_token"] = _take(src, "cls_token", path)
    for i in range(arch["depth"]):
        for part in TIMM_BLOCK_KEYS:
            for t in ("weight", "bias"):
                name = f"blocks.{i}.{part}.{t}"
                if t == "weight" or part != "attn.qkv" or arch["qkv_bias"]:
                    out[name] = _take(src, name, path)
    norm = {"tokens": "norm", "pooled": "fc_norm"}.get(arch["final_norm"])
    for t in ("weight", "bias"):
        if norm:
            out[f"norm.{t}"] = _take(src, f"{norm}.{t}", path)
        if arch["num_classes"] is not None:
            out[f"head.{t}"] = _take(src, f"head.{t}", path)
    _leftover(src, path)
    guessed = frozenset({"heads"})
    return Pretrained(path, "timm", check_shapes(path, out, arch), out, guessed)


def _timm_arch(path: Path, raw: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A timm ViT's architecture from its tensors' names and shapes."""
    if "patch_embed.proj.weight" not in raw or "pos_embed" not in raw:
        raise PretrainedError(f"{path}: no patch_embed.proj.weight or pos_embed: not a timm "
                              "ViT state dict")
    w = raw["patch_embed.proj.weight"]
    _patch_linear(w, path, "patch_embed.proj.weight")
    dim, channels, patch = w.shape[0], w.shape[1], w.shape[2]
    depth = len({m.group(1) for k in raw if (m := re.match(r"blocks\.(\d+)\.", k))})
    cls = "cls_token" in raw
    tokens = raw["pos_embed"].shape[1]
    grid = math.isqrt(tokens - cls)
    if grid * grid != tokens - cls:
        no_embed_class = cls and math.isqrt(tokens) ** 2 == tokens
        raise PretrainedError(
            f"{path}: pos_embed has {tokens} tokens: " + (
                "a position embedding without the class token's entry (timm no_embed_class) "
                "is not supported by bitvit's ViT" if no_embed_class
                else "expected a square grid of patches (plus the class token's)"))
    if cls and "fc_norm.weight" in raw:
        raise PretrainedError(f"{path}: fc_norm beside a class token: timm's average pooling "
                              "over the patch tokens alone (global_pool='avg') is not supported "
                              "by bitvit's ViT")
    final_norm = ("pooled" if "fc_norm.weight" in raw else "tokens" if "norm.weight" in raw
                  else "none")
    hidden = raw["blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * dim
    return {"image_size": grid * patch, "in_channels": channels, "patch_size": patch,
            "dim": dim, "depth": depth,
            "heads": dim // TIMM_HEAD_DIM if dim % TIMM_HEAD_DIM == 0 else None,
            "mlp_ratio": mlp_ratio(dim, hidden),
            "num_classes": raw["head.weight"].shape[0] if "head.weight" in raw else None,
            "pooling": "cls" if cls else "mean", "norm_eps": TIMM_NORM_EPS,
            "final_norm": final_norm, "qkv_bias": "blocks.0.attn.qkv.bias" in raw,
            "gelu": "exact"}


# ---------------------------------------------------------------------------------------------
# Fitting a state to a model
# ---------------------------------------------------------------------------------------------


def check_shapes(path: Path, state: dict[str, torch.Tensor],
                 arch: dict[str, Any]) -> dict[str, Any]:
    """``arch``, after checking that it builds a ViT with ``state``'s shapes (the head's when
    it has one); a one-line error naming the first tensor that does not fit."""
    try:
        # The head count does not change a shape: any divisor will do where it is unknown.
        config = ViTConfig(**{**arch, "heads": arch["heads"] or 1,
                              "num_classes": arch["num_classes"] or 1})
    except (TypeError, ValueError) as e:
        raise PretrainedError(f"{path}: an architecture bitvit's ViT cannot build "
                              f"({error_reason(e)})") from None
    with torch.device("meta"):
        own = VisionTransformer(config).state_dict()
    for key, value in own.items():
        if key.startswith("head.") and arch["num_classes"] is None:
            continue
        if key not in state:
            raise PretrainedError(f"{path}: no tensor for {key}")
        if state[key].shape != value.shape:
            raise PretrainedError(f"{path}: {key} has shape {tuple(state[key].shape)}, "
                                  f"expected {tuple(value.shape)} from its architecture")
    return arch


def resample_pos_embed(pos: torch.Tensor, grid: int, prefix: int) -> torch.Tensor:
    """Position embeddings (1, prefix + g * g, dim) resampled to a ``grid`` x ``grid`` of
    patches, bicubic (antialiased when shrinking), as timm's ``resample_abs_pos_embed``; the
    ``prefix`` tokens' (the class token's) entries are kept as they are."""
    head, patches = pos[:, :prefix], pos[:, prefix:]
    old = math.isqrt(patches.shape[1])
    dim = patches.shape[-1]
    x = patches.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    x = x.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos.dtype)
    return torch.cat([head, x], dim=1)


def fit_state(state: dict[str, torch.Tensor], source: dict[str, Any], target: ViTConfig,
              own: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A source's state for a model of ``target``'s sizes: position embeddings resampled to
    its image size, and, for another class count or a source without one, the head of
    ``own`` (the model's state, freshly initialised). Returns the state and what was done."""
    state, notes = dict(state), []
    if source["image_size"] != target.image_size:
        old, new = (s // target.patch_size for s in (source["image_size"], target.image_size))
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], new,
                                                int(target.pooling == "cls"))
        notes.append(f"position embeddings resampled from {old}x{old} to {new}x{new} patches "
                     f"(image size {source['image_size']} -> {target.image_size}, bicubic)")
    if source["num_classes"] != target.num_classes or "head.weight" not in state:
        had = (f"{source['num_classes']} classes" if source["num_classes"] is not None
               else "no classifier head")
        notes.append(f"the source has {had}, the model {target.num_classes}: the classifier "
                     "head starts freshly initialised")
        state.update({k: v for k, v in own.items() if k.startswith("head.")})
    return state, notes
