"""Export a trained model to one small safetensors file, load it back, and classify images.

The file holds only what inference needs:

- quantized layers (``BitLinear``): the weight codes, packed; the scale in fp32; the bias.
  Ternary codes (``b158``, ``b158c``, ``twn``) go 5 per byte in base 3 (1.6 bits per weight,
  close to the log2(3) = 1.585 limit), or 4 per byte in 2 bits with ``packing="2bit"``. Binary
  codes (``bitnet``, ``sign``, ``xnor``) go 8 per byte. Each method's row of
  `bitvit.nn.methods.METHOD_TABLE` says which packings its codes take and how many scales it has.
- every other parameter (patch/position embeddings, LayerNorms, the head, full-precision
  linears) in fp16 (``float_dtype="fp16"``, the default) or fp32.

The safetensors metadata holds ``format`` ("bitvit-export"), ``format_version``, the
config, the class names, the preprocessing (image size, channels, mean, std), one entry per
quantized layer (shape, method, act_bits, sub_norm, packing), a SHA-256 of the tensor
bytes and one of the other metadata entries (``metadata_sha256``), so a corrupted file is caught
on load rather than giving wrong predictions.

Tensor names: ``<layer>.codes`` (uint8, packed), ``<layer>.scale`` (fp32, (1,) or (out,)),
``<layer>.bias`` for quantized layers; the model's own state-dict names for the rest.

Packing layouts (flattened row-major codes, zero-padded at the end to whole bytes):

- base3: byte i = sum_k (c[5i+k] + 1) * 3^k, k = 0..4 (values 0..242).
- 2bit:  byte i = sum_k (c[4i+k] + 1) << 2k, k = 0..3 (fields 0..2).
- 1bit:  byte i = sum_k [c[8i+k] = +1] << k, k = 0..7 (little-endian bit order).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from bitvit import files
from bitvit.data import IMAGE_EXTS
from bitvit.deploy.packing import PACK, UNPACK, packed_numel
from bitvit.deploy.preprocessing import Preprocessing, is_numbers
from bitvit.files import atomic_file
from bitvit.nn.methods import CODES_PER_BYTE, METHOD_TABLE
from bitvit.nn.model import VisionTransformer
from bitvit.nn.quant import BitLinear
from bitvit.system import memory_shortfall
from bitvit.training import memory, rundir
from bitvit.training.checkpoint import build_model, load_checkpoint
from bitvit.training.config import Config, ConfigError, short_repr

EXPORT_FORMAT = "bitvit-export"
FORMAT_VERSION = "1"
PACKINGS = ("base3", "2bit")  # the choice for ternary codes; binary codes are always 1bit
FLOAT_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


class ExportError(ValueError):
    """A bad or mismatched export file; the message is one line naming the file."""


# ---------------------------------------------------------------------------------------------
# The loaded model.
# ---------------------------------------------------------------------------------------------


class ExportedModel(nn.Module):
    """An exported model, ready for inference, with what it needs to read images.

    - ``model(x)``: logits for normalized float images (N, C, S, S), like the trained model.
    - ``model.preprocess(images_uint8)``: uint8 (N, C, H, W) -> normalized float input.
    - ``model.logits(images_uint8)``: preprocess + forward in batches, on the model's device
      (what evaluation needs); ``model.predict(images_uint8, top_k)``: (class, prob) lists.
    - ``.classes`` (list of names), ``.preprocessing`` (`Preprocessing`), ``.config``
      (`Config`), ``.path`` (the file), ``.vit`` (the `VisionTransformer` whose quantized
      linears are `bitvit.deploy.engine.InferenceLinear`), ``.engine`` (int, fp or ort) and
      ``.engine_reason`` (why that engine: given, or what `bitvit.load`'s auto measured).
    """

    def __init__(self, vit: VisionTransformer, config: Config, classes: list[str],
                 preprocessing: Preprocessing, path: Path | None = None,
                 engine: str = "int", engine_reason: str = "given") -> None:
        super().__init__()
        self.vit = vit
        self.config = config
        self.classes = classes
        self.preprocessing = preprocessing
        self.path = path
        self.engine = engine
        self.engine_reason = engine_reason

    @property
    def device(self) -> torch.device:
        return next(iter(self.vit.state_dict().values())).device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return self.preprocessing(images)

    @torch.inference_mode()
    def logits(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """uint8 images (N, C, H, W) -> float32 logits (N, classes) on the model's device."""
        if images.dim() == 3:
            images = images[None]
        out = [self(self.preprocess(images[i:i + batch_size].to(self.device)))
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.empty(0, len(self.classes), device=self.device)

    def predict(self, images: torch.Tensor, top_k: int = 5,
                batch_size: int = 500) -> list[list[tuple[str, float]]]:
        """uint8 images -> for each, the top ``top_k`` (class name, probability), best first."""
        probs = self.logits(images, batch_size).float().softmax(dim=-1)
        p, idx = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        return [[(self.classes[i], q) for i, q in zip(row_i, row_p, strict=True)]
                for row_i, row_p in zip(idx.tolist(), p.tolist(), strict=True)]


# ---------------------------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------------------------


def _quantized_layers(model: nn.Module) -> dict[str, BitLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BitLinear)}


def _layer_info(layer: BitLinear, packing: str) -> dict:
    return {"shape": [layer.out_features, layer.in_features], "method": layer.method,
            "act_bits": layer.act_bits, "sub_norm": layer.sub_norm,
            "packing": METHOD_TABLE[layer.method].packing(packing)}


def _skeleton(config: Config) -> VisionTransformer:
    """The model the config describes, on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return build_model(config)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _metadata_digest(meta: dict[str, str]) -> str:
    """A SHA-256 of every metadata entry but its own: the tensors' checksum does not cover the
    config, classes or preprocessing, whose corruption would change predictions as surely."""
    body = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def model_metadata(config: Config, classes: Sequence[str]) -> dict[str, str]:
    """What every export format records about the model: its config, class names and
    preprocessing, as JSON strings (read back by `parse_model_metadata`)."""
    try:
        preprocessing = Preprocessing.from_config(config)
    except ValueError as e:  # data.mean or std still "auto": not a trained model's config
        raise ExportError(str(e)) from None
    return {"config": json.dumps(config.to_dict()), "classes": json.dumps(list(classes)),
            "preprocessing": json.dumps(preprocessing.to_dict())}


def parse_model_metadata(path: Path, meta: dict[str, str]) -> tuple[Config, list[str],
                                                                    Preprocessing]:
    """The config, class names and preprocessing of `model_metadata`, checked against each
    other; `ExportError` (one line naming ``path``) for anything missing or inconsistent."""
    try:
        config = Config.from_dict(files.parse_json(meta["config"]), source=str(path))
        classes = files.parse_json(meta["classes"])
        preprocessing = Preprocessing.from_dict(files.parse_json(meta["preprocessing"]))
    except (KeyError, TypeError, json.JSONDecodeError, ConfigError, ValueError,
            OverflowError) as e:  # OverflowError: an integer past float's range in a list
        raise ExportError(f"{path}: bad export metadata ({type(e).__name__}: {e})") from None
    if (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)
            or len(classes) != config.model.num_classes):
        raise ExportError(f"{path}: bad export metadata (class names do not match "
                          f"model.num_classes={config.model.num_classes})")
    _check_preprocessing(path, preprocessing, config)
    return config, classes, preprocessing


def export_model(model: nn.Module, config: Config, classes: list[str], path: str | Path,
                 packing: str = "base3", float_dtype: str = "fp16") -> Path:
    """Write ``model`` (a `VisionTransformer`, quantized as ``config`` says) for inference.

    ``packing``: ``base3`` (ternary codes at 1.6 bits) or ``2bit``; binary codes always take
    1 bit. ``float_dtype``: ``fp16`` or ``fp32`` for every parameter but codes and scales.
    The file is written atomically (a temporary file, then renamed). Returns the path.
    """
    if packing not in PACKINGS:
        raise ValueError(f"unknown packing {packing!r}: expected one of {', '.join(PACKINGS)}")
    if float_dtype not in FLOAT_DTYPES:
        raise ValueError(f"unknown float_dtype {float_dtype!r}: expected fp16 or fp32")
    if len(classes) != config.model.num_classes:
        raise ValueError(f"{len(classes)} class names for a model with "
                         f"{config.model.num_classes} classes")
    if not all(isinstance(c, str) for c in classes):
        raise ValueError(f"class names must be strings, got {short_repr(list(classes))}")
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper prefixes every name
    if isinstance(model, nn.parallel.DistributedDataParallel):  # and so does DDP
        model = model.module
    layers = _quantized_layers(model)
    skeleton = _skeleton(config)
    expected = _quantized_layers(skeleton)
    if {n: _layer_info(m, packing) for n, m in layers.items()} != {
            n: _layer_info(m, packing) for n, m in expected.items()}:
        raise ValueError("the model's quantized layers do not match its config's quant section")
    dtype = FLOAT_DTYPES[float_dtype]

    tensors: dict[str, torch.Tensor] = {}
    info = {}
    for name, layer in layers.items():
        codes, scale = layer.quantized_weight()
        info[name] = _layer_info(layer, packing)
        tensors[f"{name}.codes"] = PACK[info[name]["packing"]](codes.cpu())
        tensors[f"{name}.scale"] = scale.detach().float().reshape(-1).cpu()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().to(dtype).cpu()
    quantized_keys = {f"{n}.{p}" for n in layers for p in ("weight", "bias")}
    for key, value in model.state_dict().items():
        if key in quantized_keys:
            continue
        value = value.detach().cpu()
        tensors[key] = value.to(dtype) if value.is_floating_point() else value
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{key} has values that are not finite in {float_dtype}"
                             + (" (beyond the fp16 range: export with fp32)"
                                if float_dtype == "fp16" else ""))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    # What load will check, checked before writing: a file that cannot load is not written.
    problem = _tensor_mismatch(tensors, _expected_tensors(skeleton, expected, info, dtype)[0])
    if problem:
        raise ValueError(f"the model's tensors do not match its config ({problem})")

    metadata = {
        "format": EXPORT_FORMAT,
        "format_version": FORMAT_VERSION,
        **model_metadata(config, classes),
        "layers": json.dumps(info),
        "float_dtype": float_dtype,
        "sha256": _digest(tensors),
    }
    metadata["metadata_sha256"] = _metadata_digest(metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Whole or not at all; a full disk raises OSError naming the file, and leaves no temporary.
    return atomic_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def export_checkpoint(src: str | Path, out: str | Path, best: bool = False, **opts) -> Path:
    """Export a run folder, checkpoint folder or model.safetensors (see `export_model`)."""
    ckpt = load_checkpoint(src, best)
    try:
        return export_model(ckpt.model, ckpt.config, ckpt.classes, out, **opts)
    except ExportError:
        raise
    except ValueError as e:  # the model or an option (values beyond fp16): name the file
        raise ExportError(f"{out}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Load.
# ---------------------------------------------------------------------------------------------


def read_export_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an export file, checked for its format and version."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path}: is a folder; expected an exported .safetensors file")
    if not path.exists():
        raise ExportError(f"{path}: no such file")
    if not path.is_file():
        raise ExportError(f"{path}: not a regular file; expected an exported .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{path}: not a readable safetensors file "
                          f"({str(e).splitlines()[0]})") from None
    fmt = meta.get("format")
    if fmt != EXPORT_FORMAT:
        hint = (" (a training checkpoint: export it with `bitvit export`)"
                if fmt == "bitvit-checkpoint" else "")
        raise ExportError(f"{path}: not a bitvit export (format {fmt!r}){hint}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ExportError(f"{path}: unknown export format version {version!r} (this bitvit "
                          f"reads version {FORMAT_VERSION}; a newer bitvit may read it)")
    # Exports written before it have no metadata checksum: their tensors' is checked still.
    if "metadata_sha256" in meta and meta["metadata_sha256"] != _metadata_digest(meta):
        raise ExportError(f"{path}: corrupt export (its metadata does not match its checksum)")
    return meta


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is a file that claims to be a bitvit export (any version)."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        with safe_open(str(p), framework="pt") as f:
            return (f.metadata() or {}).get("format") == EXPORT_FORMAT
    except (SafetensorError, OSError, ValueError):
        return False


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:  # read whole: a file larger than the memory (a sparse one costs nothing) is refused
        why = memory_shortfall(files.stored_bytes(path, "bitvit export"))
    except files.FileRefused as e:
        raise ExportError(str(e)) from None
    if why:
        raise ExportError(f"{path}: {why}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ExportError(f"{path}: corrupt or truncated export "
                          f"({str(e).splitlines()[0]})") from None


def _check_preprocessing(path: Path, p: Preprocessing, config: Config) -> None:
    """The stored preprocessing must fit the stored config, or every image would be blamed."""
    def bad(what: str) -> ExportError:
        return ExportError(f"{path}: bad export metadata (preprocessing.{what})")

    for key, config_key, want in (("image_size", "image_size", config.model.image_size),
                                  ("channels", "in_channels", config.model.in_channels)):
        if getattr(p, key) != want:
            raise bad(f"{key}={getattr(p, key)!r}: expected model.{config_key}={want} of the "
                      "stored config")
    for key in ("mean", "std"):
        values = getattr(p, key)
        if len(values) != p.channels:
            raise bad(f"{key}={list(values)}: expected one number per channel ({p.channels})")
        if not all(math.isfinite(v) and (key == "mean" or v > 0) for v in values):
            raise bad(f"{key}={list(values)}: expected finite numbers"
                      + (" > 0" if key == "std" else ""))
    if p.interpolation != "bilinear":
        raise bad(f"interpolation={p.interpolation!r}: expected 'bilinear'")
    for key in ("mean", "std"):
        want = getattr(config.data, key)
        if (not isinstance(want, list | tuple) or not is_numbers(list(want))
                or tuple(map(float, want)) != getattr(p, key)):
            shown = list(want) if isinstance(want, list | tuple) else repr(want)
            raise bad(f"{key}={list(getattr(p, key))}: expected data.{key}={shown} of the "
                      "stored config")


def _mismatch(path: Path, what: str) -> ExportError:
    return ExportError(f"{path}: tensors do not match the stored config ({what})")


def load(path: str | Path, device: str | torch.device = "cpu", engine: str = "int",
         compile: bool = False) -> ExportedModel:
    """Load an exported model on a torch engine: an `ExportedModel` in eval mode on ``device``.

    (`bitvit.load`, `bitvit.deploy.auto.load`, adds the ort engine and auto, its default.)
    Quantized layers become `bitvit.deploy.engine.InferenceLinear` (``engine``: ``int`` for the
    integer kernels, ``fp`` for the fake-quant arithmetic of training's plain path); the
    other parameters are loaded back in fp32. Use ``model(x)`` on normalized images,
    ``model.logits(images_uint8)`` on raw ones, ``model.classes``, ``model.preprocessing``.
    ``compile``: run the ViT under ``torch.compile`` (`bitvit.deploy.engine.compile_model`: compiled
    here, on a dummy batch, so it costs load time rather than the first call; on failure a
    warning and the eager model). ``model.vit`` is then the compiled wrapper of the ViT.
    With cls pooling the last block computes the cls token's output only
    (`bitvit.deploy.engine.ClsTokenBlock`): the same logits, fewer products.
    Raises `ExportError` (one line naming the file) for anything that is not a readable
    export of this format version whose tensors match its config.
    """
    from bitvit.deploy.engine import check_engine, cls_token_last_block, compile_model

    check_engine(engine)
    path = Path(path)
    meta = read_export_metadata(path)
    config, classes, preprocessing = parse_model_metadata(path, meta)
    info, checksum, float_dtype = _layer_metadata(path, meta)
    memory.check_inference_fits(config, str(path))  # before the skeleton is built
    tensors = _read_tensors(path)
    if _digest(tensors) != checksum:
        raise ExportError(f"{path}: corrupt export (tensor data does not match its checksum)")

    vit = _skeleton(config)
    layers = _quantized_layers(vit)
    _check_layers(path, info, layers)
    expected, layer_keys = _expected_tensors(vit, layers, info, float_dtype)
    problem = _tensor_mismatch(tensors, expected)
    if problem:
        raise _mismatch(path, problem)
    _install_layers(path, vit, layers, info, tensors, engine)
    floats = {k: tensors[k].float() if tensors[k].is_floating_point() else tensors[k]
              for k in expected if k not in layer_keys}
    vit.load_state_dict(floats, strict=False, assign=True)
    model = ExportedModel(cls_token_last_block(vit), config, classes, preprocessing, path,
                          engine)
    model = model.requires_grad_(False).eval().to(device)
    if compile:
        size, channels = preprocessing.image_size, preprocessing.channels
        example = torch.zeros(2, channels, size, size, device=device)
        torch._dynamo.mark_dynamic(example, 0)  # one graph for every batch size above 1
        model.vit = compile_model(model.vit, example)
    return model


def _layer_metadata(path: Path, meta: dict[str, str]) -> tuple[Any, str, torch.dtype]:
    """The quantized layers' record, the tensors' checksum and the float dtype."""
    try:
        info = files.parse_json(meta["layers"])
        checksum = meta["sha256"]
        if meta["float_dtype"] not in FLOAT_DTYPES:
            raise ValueError(f"float_dtype {meta['float_dtype']!r} is not fp16 or fp32")
        return info, checksum, FLOAT_DTYPES[meta["float_dtype"]]
    except (KeyError, TypeError, json.JSONDecodeError, ValueError) as e:
        raise ExportError(f"{path}: bad export metadata ({type(e).__name__}: {e})") from None


def _check_layers(path: Path, info: Any, layers: dict[str, BitLinear]) -> None:
    """The file's quantized layers are the config's, each with a packing its method allows."""
    if not isinstance(info, dict) or set(info) != set(layers):
        extra = sorted(set(info) - set(layers)) if isinstance(info, dict) else ["?"]
        missing = sorted(set(layers) - set(info)) if isinstance(info, dict) else []
        raise _mismatch(path, f"layer {extra[0]} is not quantized in the config" if extra
                        else f"no entry for quantized layer {missing[0]}")
    for name, layer in layers.items():
        stored = info[name]
        packing = stored.get("packing") if isinstance(stored, dict) else None
        allowed = METHOD_TABLE[layer.method].packings
        if packing not in allowed or stored != _layer_info(layer, packing):
            raise _mismatch(path, f"layer {name}: stored {stored}, config gives "
                                  f"{_layer_info(layer, allowed[0])}")


def _expected_tensors(vit: VisionTransformer, layers: dict[str, BitLinear], info: dict[str, Any],
                      float_dtype: torch.dtype
                      ) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], set[str]]:
    """Every tensor the file must hold, with its shape and dtype (a wrong dtype would otherwise
    fail deep inside load_state_dict or the kernels), and the keys of the quantized layers'."""
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    quantized_keys = set()  # the latent-weight model's keys that the file replaces
    layer_keys = set()  # the file's keys for quantized layers
    for name, layer in layers.items():
        out_f, in_f = layer.out_features, layer.in_features
        per_byte = CODES_PER_BYTE[info[name]["packing"]]
        expected[f"{name}.codes"] = ((packed_numel(out_f * in_f, per_byte),), torch.uint8)
        n_scales = METHOD_TABLE[layer.method].scale_count(out_f)
        expected[f"{name}.scale"] = ((n_scales,), torch.float32)
        quantized_keys |= {f"{name}.weight", f"{name}.bias"}
        if layer.bias is not None:
            expected[f"{name}.bias"] = ((out_f,), float_dtype)
        layer_keys |= {f"{name}.codes", f"{name}.scale", f"{name}.bias"}
    for key, value in vit.state_dict().items():
        if key not in quantized_keys:
            expected[key] = (tuple(value.shape),
                             float_dtype if value.is_floating_point() else value.dtype)
    return expected, layer_keys


def _tensor_mismatch(tensors: dict[str, torch.Tensor],
                     expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> str | None:
    """The first way ``tensors`` differ from ``expected`` (names, shapes, dtypes), or None."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        return f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
    for key, (shape, dtype) in expected.items():
        if tuple(tensors[key].shape) != shape:
            return f"{key} has shape {tuple(tensors[key].shape)}, expected {shape}"
        if tensors[key].dtype != dtype:
            return f"{key} has dtype {tensors[key].dtype}, expected {dtype}"
    return None


def _install_layers(path: Path, vit: VisionTransformer, layers: dict[str, BitLinear],
                    info: dict[str, Any], tensors: dict[str, torch.Tensor], engine: str) -> None:
    """Each quantized layer replaced by an `InferenceLinear` on its unpacked codes."""
    from bitvit.deploy.engine import InferenceLinear

    for name, layer in layers.items():
        try:
            codes = UNPACK[info[name]["packing"]](tensors[f"{name}.codes"],
                                                   (layer.out_features, layer.in_features))
        except ValueError as e:
            raise ExportError(f"{path}: corrupt export ({name}.codes: {e})") from None
        bias = tensors.get(f"{name}.bias")
        module = InferenceLinear(codes, tensors[f"{name}.scale"].float(),
                                 None if bias is None else bias.float(), layer.method,
                                 layer.act_bits, sub_norm=layer.sub_norm, engine=engine)
        parent, _, child = name.rpartition(".")
        setattr(vit.get_submodule(parent), child, module)


def image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (recursively, sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and f.suffix.lower() in IMAGE_EXTS
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise ExportError(f"{p}: no image files (PNG, JPEG, ...) in this folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ExportError(f"{p}: no such image file or folder")
    return files


def _run_folder_holding(path: Path) -> Path | None:
    """The run folder whose own file ``path`` is (config.yaml, metrics.csv, run.json, curves.png,
    anything in last/ or best/), else None. A new file beside them is no run's."""
    for run, entry in ((path.parent, path.name), (path.parent.parent, path.parent.name)):
        if entry in rundir.RUN_ENTRIES and (run / rundir.CONFIG).is_file():
            return run
    return None


def check_export_target(out: str | Path, fmt: str, src: Path) -> None:
    """Refuse (`ExportError`) an ``out`` that would overwrite the checkpoint ``src`` being
    exported, or whose suffix says the other format (``fmt``: safetensors or onnx), since
    `bitvit eval` and `predict` read a file by its suffix."""
    target, source = Path(out).resolve(), Path(src).resolve()
    if target == source or (target.parent == source.parent
                            and target.name in (rundir.STATE_FILE, rundir.CHECKSUMS)):
        raise ExportError(f"{out}: is part of the checkpoint it exports ({src}); write the "
                          "export elsewhere")
    run = _run_folder_holding(target)
    if run is not None:
        raise ExportError(f"{out}: is a file of the run folder {run} (a run's config, metrics, "
                          "record or checkpoint); write the export elsewhere")
    if (Path(out).suffix.lower() == ".onnx") != (fmt == "onnx"):
        wanted = ".onnx" if fmt == "onnx" else "a name not ending in .onnx (.safetensors)"
        raise ExportError(f"{out}: --format {fmt} writes {wanted}; `bitvit eval` and "
                          "`predict` read a file by its suffix")
