"""What a (quantized) ViT costs at inference: parameters, bits, bytes, MACs and energy per layer.

`profile_model` walks a model's linear layers (and attention's two matrix products), counts
what one image costs, and estimates the arithmetic energy the way the BitNet papers do: a
multiply-accumulate with a full-precision weight costs one float multiply and one float add; with
a ternary or binary weight it becomes an addition (a subtraction for -1) and a zero weight costs
nothing. The token count of every layer comes from one forward pass with hooks, with the last
block whole (`whole_last_block`): the engines compute only the class token there, so the
counts are an upper bound of what they run (the last block's patch tokens included).
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from bitvit.deploy.engine import whole_last_block
from bitvit.nn.kernels import PackedCodes, check_kernel, choose_kernel
from bitvit.nn.methods import CODES_PER_BYTE, FULL_PRECISION, METHOD_TABLE
from bitvit.nn.model import ViTConfig
from bitvit.nn.quant import quantize_weights
from bitvit.training.config import Config

# Energy per arithmetic operation in pJ. 45 nm: Horowitz, ISSCC 2014; 7 nm: as tabulated in the
# BitNet papers (Wang et al., 2023, Table 2; Ma et al., 2024). See ENERGY_SOURCE.
ENERGY_PJ: dict[str, dict[str, dict[str, float]]] = {
    "45nm": {
        "fp32": {"add": 0.9, "mul": 3.7},
        "fp16": {"add": 0.4, "mul": 1.1},
        "int8": {"add": 0.03, "mul": 0.2},
    },
    "7nm": {
        "fp32": {"add": 0.38, "mul": 1.31},
        "fp16": {"add": 0.16, "mul": 0.34},
        "int8": {"add": 0.007, "mul": 0.07},
    },
}
NODES = tuple(ENERGY_PJ)
ENERGY_SOURCE = (
    "Energy per op (pJ): 45 nm from M. Horowitz, \"Computing's energy problem (and what we can "
    "do about it)\", ISSCC 2014; 7 nm as given in H. Wang et al., \"BitNet: Scaling 1-bit "
    "Transformers for Large Language Models\", 2023 (Table 2) and S. Ma et al., \"The Era of "
    "1-bit LLMs: All Large Language Models are in 1.58 Bits\", 2024, which use this table."
)
FLOAT_PRECISIONS = ("fp32", "fp16")

# The choices for ternary codes in a packed file: 5 trits per byte (3^5 = 243 <= 256) or 4
# two-bit codes per byte (binary codes take 8 per byte; see bitvit.nn.methods.CODES_PER_BYTE).
TERNARY_PACKINGS = {"base3": 5, "2bit": 4}
# Float tensors (unquantized layers, biases, norms, embeddings) in the packed export, by
# `bitvit export --float-dtype`; an exported file records its own, a config is profiled as
# the export default.
PACKED_FLOAT_BYTES = {"fp16": 2, "fp32": 4}
DEFAULT_PACKED_FLOAT_DTYPE = "fp16"
PACKED_SCALE_BYTES = 4  # fp32 weight scales
# Packed codes are unpacked to int8 at load and held once, in the integer kernel's layout
# (bitvit.deploy.engine.InferenceLinear); under the fp32 integer kernel (bitvit.nn.kernels) a
# layer with quantized activations also caches them as fp32, under u8s8 prepacked (int8,
# oneDNN's layout).
RESIDENT_CODE_BYTES = 1
KERNEL_CODE_BYTES = {"fp32": 4, "u8s8": 1}


@dataclass
class LayerProfile:
    """One row: a linear layer, one of attention's products, or the remaining parameters."""

    name: str
    kind: str  # linear | attention | params
    method: str = FULL_PRECISION  # fp or a METHOD_TABLE name ("-" for attention and params)
    act_bits: int | None = None  # activation bits of a quantized linear
    shape: tuple[int, int] | None = None  # (out_features, in_features)
    tokens: int = 0  # rows the layer sees per image
    params: int = 0
    weights: int = 0  # entries of the weight matrix (params less bias)
    info_bits_per_weight: float = 0.0  # log2(3) ternary, 1 binary, 32 float
    stored_bits_per_weight: float = 0.0  # in the packed file
    info_bits: float = 0.0  # all of the row's parameters
    bytes_fp32: int = 0
    bytes_fp16: int = 0
    bytes_packed: int = 0
    bytes_resident: int = 0  # weights held in memory for inference
    activation_bytes: int = 0  # the layer's float input and output (and attention scores)
    zero_weights: int = 0
    macs: int = 0  # per image
    mul_macs: int = 0  # need a multiply (and an add)
    add_macs: int = 0  # ternary/binary weight +-1: an addition or subtraction only
    zero_macs: int = 0  # ternary weight 0: nothing
    ops: dict[str, int] = field(default_factory=dict)  # e.g. {"fp32_mul": n, "int8_add": n}
    baseline_ops: dict[str, int] = field(default_factory=dict)  # same layer in full precision
    energy_pj: dict[str, float] = field(default_factory=dict)  # per node
    baseline_energy_pj: dict[str, float] = field(default_factory=dict)


SUMMED = ("params", "weights", "info_bits", "bytes_fp32", "bytes_fp16", "bytes_packed",
          "bytes_resident", "zero_weights", "macs", "mul_macs", "add_macs", "zero_macs")


@dataclass
class Profile:
    rows: list[LayerProfile]
    totals: dict[str, Any]
    image_size: int
    float_precision: str
    weights_source: str  # what the zero counts come from
    source: str = ""
    assumptions: list[str] = field(default_factory=list)
    packed_float_dtype: str = DEFAULT_PACKED_FLOAT_DTYPE  # float tensors in the packed file
    int_kernel: str = "int8"  # the integer kernel (bitvit.nn.kernels) resident bytes assume
    int_kernel_reason: str = ""
    engine: str | None = None  # an export's: the engine bitvit.load's auto runs it with
    engine_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "image_size": self.image_size,
            "float_precision": self.float_precision,
            "packed_float_dtype": self.packed_float_dtype,
            "int_kernel": self.int_kernel,
            "int_kernel_reason": self.int_kernel_reason,
            "engine": self.engine,
            "engine_reason": self.engine_reason,
            "weights_source": self.weights_source,
            "rows": [asdict(r) for r in self.rows],
            "totals": self.totals,
            "energy_pj_per_op": ENERGY_PJ,
            "energy_source": ENERGY_SOURCE,
            "assumptions": self.assumptions,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format_table(self) -> str:
        return _format(self)


# ---------------------------------------------------------------------------------------------
# Counting.
# ---------------------------------------------------------------------------------------------


def _is_linear(module: nn.Module) -> bool:
    # Duck-typed so exported (packed) linears count too: they keep in/out_features.
    return hasattr(module, "in_features") and hasattr(module, "out_features")


def _method(module: nn.Module) -> str:
    method = getattr(module, "method", FULL_PRECISION)
    return method if method in METHOD_TABLE else FULL_PRECISION


def _codes(module: nn.Module, method: str) -> torch.Tensor:
    """The layer's integer weight codes: from the latent weight, or stored codes if exported."""
    if hasattr(module, "quantized_weight"):
        return module.quantized_weight()[0]
    codes = getattr(module, "codes", None)
    if codes is not None:
        return codes
    return quantize_weights(module.weight, method)[0]


def _energy(ops: dict[str, int]) -> dict[str, float]:
    out = {}
    for node, table in ENERGY_PJ.items():
        total = 0.0
        for key, count in ops.items():
            precision, op = key.split("_")
            total += count * table[precision][op]
        out[node] = total
    return out


def _add_ops(ops: dict[str, int], key: str, n: int) -> None:
    if n:
        ops[key] = ops.get(key, 0) + n


def _token_counts(model: nn.Module, vit: ViTConfig) -> tuple[dict[str, int], dict[str, int]]:
    """Rows each linear sees and tokens each attention attends over, for one image."""
    linear_tokens: dict[str, int] = {}
    attn_tokens: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if _is_linear(module):
            def hook(m, inputs, _out, name=name):  # noqa: ANN001
                linear_tokens[name] = inputs[0].numel() // m.in_features
            hooks.append(module.register_forward_hook(hook))
        elif hasattr(module, "qkv") and hasattr(module, "heads"):
            def hook(_m, inputs, _out, name=name):  # noqa: ANN001
                attn_tokens[name] = inputs[0].shape[-2]
            hooks.append(module.register_forward_hook(hook))
    param = next(model.parameters(), None)
    device = param.device if param is not None else "cpu"
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(1, vit.in_channels, vit.image_size, vit.image_size, device=device, dtype=dtype)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return linear_tokens, attn_tokens


def profile_model(
    model: nn.Module,
    config: Config | ViTConfig,
    float_precision: str = "fp32",
    ternary_packing: str = "base3",
    weights_source: str = "the model's weights",
    source: str = "",
    packed_float_dtype: str | None = None,
    int_kernel: str | None = None,
) -> Profile:
    """Profile one image's inference through ``model`` (a `VisionTransformer`, quantized or not).

    ``float_precision`` is the precision of every float operation (unquantized layers, attention,
    rescales) and of the baseline the energy is compared with. ``ternary_packing``: ``base3``
    (5 trits per byte, 1.6 bits per weight) or ``2bit``. ``packed_float_dtype``: how the packed
    file stores its float tensors, ``fp16`` or ``fp32`` (an export's own: `ProfileSource`'s
    ``float_dtype``); None: fp16, the export default. Zero weights are counted from the
    layer's actual codes, so they are only as meaningful as ``weights_source``.
    ``int_kernel``: the integer product's kernel the resident bytes assume (`bitvit.nn.kernels`;
    ``fp32`` caches fp32 codes, 4 more bytes per weight of a layer with quantized activations,
    ``u8s8`` prepacked int8 codes, 1 more);
    None: the one this process chooses for the model's device. A converted model's layers
    count the kernel they use.
    """
    if not isinstance(model, nn.Module):  # an ONNX Runtime session has no layers to read
        raise TypeError(f"profile_model needs a torch module, got {type(model).__name__}: load "
                        "an export with engine='int' or 'fp' to profile it")
    packed_dtype = packed_float_dtype or DEFAULT_PACKED_FLOAT_DTYPE
    for key, value, valid in (("float_precision", float_precision, FLOAT_PRECISIONS),
                              ("packed_float_dtype", packed_dtype, PACKED_FLOAT_BYTES),
                              ("ternary_packing", ternary_packing, TERNARY_PACKINGS)):
        if value not in valid:
            raise ValueError(f"{key}={value!r}: expected one of {', '.join(valid)}")
    packed_float_bytes = PACKED_FLOAT_BYTES[packed_dtype]
    if int_kernel is None:
        param = next(model.parameters(), None)
        choice = choose_kernel(param.device if param is not None else "cpu")
        kernel, kernel_reason = choice.name, choice.reason
    else:
        kernel, kernel_reason = check_kernel(int_kernel, "int_kernel"), "given"
    vit = config.model if isinstance(config, Config) else config
    fp = float_precision
    float_bytes = 4 if fp == "fp32" else 2
    with whole_last_block(model):
        linear_tokens, attn_tokens = _token_counts(model, vit)

    rows: list[LayerProfile] = []
    counted: set[int] = set()  # parameters already in a row, by identity
    for name, module in model.named_modules():
        if _is_linear(module):
            rows.append(_linear_row(name, module, linear_tokens.get(name, 0), fp, float_bytes,
                                    ternary_packing, packed_float_bytes,
                                    getattr(module, "kernel", None) or kernel))
            counted.update(id(p) for p in module.parameters(recurse=False))
            # Attention's two products run between qkv and proj: list them there.
            attn_name = name.rpartition(".")[0]
            if name.endswith(".qkv") and attn_name in attn_tokens:
                rows += _attention_rows(attn_name, attn_tokens[attn_name], vit.dim,
                                        vit.heads, fp, float_bytes)

    rows += _other_param_rows(model, counted, float_bytes, packed_float_bytes)
    for row in rows:
        row.energy_pj = _energy(row.ops)
        row.baseline_energy_pj = _energy(row.baseline_ops)

    totals = _totals(rows)
    totals["bytes_held_by_module"] = _bytes_held(model)
    return Profile(rows, totals, vit.image_size, fp, weights_source, source,
                   _assumptions(fp, ternary_packing, packed_float_dtype, kernel), packed_dtype,
                   kernel, kernel_reason)


def _other_param_rows(model: nn.Module, counted: set[int], float_bytes: int,
                      packed_float_bytes: int) -> list[LayerProfile]:
    """Everything else that holds parameters (cls_token, pos_embed, LayerNorms), so that the
    totals are the model's parameter count exactly."""
    norm_params, other = [], []
    for pname, p in model.named_parameters():
        if id(p) in counted:
            continue
        owner = model.get_submodule(pname.rpartition(".")[0]) if "." in pname else model
        (norm_params if isinstance(owner, nn.LayerNorm) else other).append((pname, p))
    rows = []
    if other:
        rows.append(_params_row(", ".join(n for n, _ in other), other, float_bytes,
                                packed_float_bytes))
    if norm_params:
        rows.append(_params_row("layer norms", norm_params, float_bytes, packed_float_bytes))
    return rows


def _bytes_held(model: nn.Module) -> int:
    """What this PyTorch module holds as loaded (a training model's latent fp32 weights, an
    inference model's codes, plus the fp engine's cached fp32 weights and the u8s8 kernel's
    prepacked codes), shared tensors once."""
    seen: dict[tuple[int, int], int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[(t.data_ptr(), t.nbytes)] = t.nbytes
    packed = [getattr(m, "packed", None) for m in model.modules()]
    return sum(seen.values()) + sum(p.nbytes for p in packed if isinstance(p, PackedCodes))


def _linear_row(name: str, m: nn.Module, tokens: int, fp: str, float_bytes: int,
                ternary_packing: str, packed_float_bytes: int, kernel: str) -> LayerProfile:
    out_f, in_f = m.out_features, m.in_features
    bias = getattr(m, "bias", None)
    n_bias = bias.numel() if bias is not None else 0
    n = out_f * in_f
    method = _method(m)
    row = LayerProfile(name, "linear", method, shape=(out_f, in_f), tokens=tokens,
                       params=n + n_bias, weights=n)
    row.bytes_fp32 = 4 * row.params
    row.bytes_fp16 = 2 * row.params
    row.macs = tokens * n
    row.activation_bytes = float_bytes * tokens * (in_f + out_f)
    _add_ops(row.baseline_ops, f"{fp}_mul", row.macs)
    _add_ops(row.baseline_ops, f"{fp}_add", row.macs)
    if method == FULL_PRECISION:
        row.act_bits = None
        row.info_bits_per_weight = 32.0
        row.stored_bits_per_weight = 8.0 * packed_float_bytes
        row.info_bits = 32.0 * row.params
        row.bytes_packed = packed_float_bytes * row.params
        row.bytes_resident = float_bytes * row.params
        row.mul_macs = row.macs
        row.ops = dict(row.baseline_ops)
        return row

    act_bits = getattr(m, "act_bits", None)
    row.act_bits = act_bits
    codes = _codes(m, method)
    row.zero_weights = int((codes == 0).sum())
    spec = METHOD_TABLE[method]
    n_scales = spec.scale_count(out_f)
    row.info_bits_per_weight = spec.info_bits
    row.stored_bits_per_weight = spec.stored_bits(ternary_packing)
    row.info_bits = spec.info_bits * n + 32.0 * (n_bias + n_scales)
    row.bytes_packed = (math.ceil(n / CODES_PER_BYTE[spec.packing(ternary_packing)])
                        + PACKED_SCALE_BYTES * n_scales + packed_float_bytes * n_bias)
    code_bytes = RESIDENT_CODE_BYTES
    if getattr(m, "engine", None) == "fp":  # the fp engine's cached fp32 weight, no kernel
        code_bytes += 4
    elif act_bits in (8, 1):  # an integer product: the kernel's own copy of the codes too
        code_bytes += KERNEL_CODE_BYTES.get(kernel, 0)
    row.bytes_resident = code_bytes * n + 4 * n_scales + float_bytes * n_bias
    row.zero_macs = tokens * row.zero_weights
    row.add_macs = row.macs - row.zero_macs
    # Integer activations (8-bit, or 1-bit signs) accumulate in integers: BitNet prices these
    # as INT8 adds. Float activations (weights-only quantization) add in float.
    _add_ops(row.ops, "int8_add" if act_bits in (8, 1) else f"{fp}_add", row.add_macs)
    # Quantizing the activations, per input element: the reduction its scale comes from (absmax,
    # or mean |x| for signs) as one add, and for 8 bits the multiply by 127 / absmax; only the
    # quantized model pays it, so leaving it out would flatter the ratio.
    if act_bits in (8, 1):
        _add_ops(row.ops, f"{fp}_add", tokens * in_f)
        if act_bits == 8:
            _add_ops(row.ops, f"{fp}_mul", tokens * in_f)
    # One rescale per output (weight scale times the token's activation scale); sign with float
    # activations has scale 1 and needs none.
    if not (spec.granularity == "none" and act_bits is None):
        _add_ops(row.ops, f"{fp}_mul", tokens * out_f)
    return row


def _attention_rows(name: str, tokens: int, dim: int, heads: int, fp: str, float_bytes: int
                    ) -> list[LayerProfile]:
    rows = []
    # q, k, v and the heads x T x T scores (a fused kernel may never hold all the scores).
    activations = float_bytes * (3 * tokens * dim + heads * tokens * tokens)
    for product in ("qk", "av"):
        # Over all heads: T x T scores from T x dim queries and keys (QK^T), then T x dim
        # outputs from the T x T weights and T x dim values (AV): T * T * dim MACs each.
        row = LayerProfile(f"{name}.{product}", "attention", "-", tokens=tokens)
        row.macs = row.mul_macs = tokens * tokens * dim
        _add_ops(row.ops, f"{fp}_mul", row.macs)
        _add_ops(row.ops, f"{fp}_add", row.macs)
        row.baseline_ops = dict(row.ops)
        row.activation_bytes = activations
        rows.append(row)
    return rows


def _params_row(name: str, params: list[tuple[str, nn.Parameter]], float_bytes: int,
                packed_float_bytes: int) -> LayerProfile:
    count = sum(p.numel() for _, p in params)
    return LayerProfile(
        name, "params", "-", params=count, info_bits=32.0 * count, bytes_fp32=4 * count,
        bytes_fp16=2 * count, bytes_packed=packed_float_bytes * count,
        bytes_resident=float_bytes * count, info_bits_per_weight=32.0,
        stored_bits_per_weight=8.0 * packed_float_bytes,
    )


def _sum_dicts(dicts: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _totals(rows: list[LayerProfile]) -> dict[str, Any]:
    totals: dict[str, Any] = {key: sum(getattr(r, key) for r in rows) for key in SUMMED}
    totals["ops"] = _sum_dicts([r.ops for r in rows])
    totals["baseline_ops"] = _sum_dicts([r.baseline_ops for r in rows])
    totals["energy_pj"] = _sum_dicts([r.energy_pj for r in rows])
    totals["baseline_energy_pj"] = _sum_dicts([r.baseline_energy_pj for r in rows])
    totals["energy_ratio"] = {
        node: totals["baseline_energy_pj"][node] / totals["energy_pj"][node]
        if totals["energy_pj"].get(node) else None
        for node in NODES
    }
    params = totals["params"]
    # Layers run one after another: the working memory is the largest layer's, not the sum.
    totals["activation_bytes_peak"] = max((r.activation_bytes for r in rows), default=0)
    totals["info_bits_per_param"] = totals["info_bits"] / params if params else 0.0
    totals["stored_bits_per_param"] = 8.0 * totals["bytes_packed"] / params if params else 0.0
    linear = [r for r in rows if r.kind == "linear"]
    totals["quantized_weights"] = sum(r.weights for r in linear if r.method != FULL_PRECISION)
    return totals


def _assumptions(fp: str, ternary_packing: str, packed_float_dtype: str | None, kernel: str,
                 ) -> list[str]:
    per_byte = TERNARY_PACKINGS[ternary_packing]
    per_channel = ", ".join(n for n, row in METHOD_TABLE.items() if row.granularity == "channel")
    floats = (f"{DEFAULT_PACKED_FLOAT_DTYPE} biases and other float tensors (bitvit export's "
              "default; --float-dtype fp32 doubles them)" if packed_float_dtype is None
              else f"{packed_float_dtype} biases and other float tensors")
    return [
        "Counts are per image (batch 1); MACs are those of the linear layers and attention's "
        "QK^T and AV products. Biases, norms, softmax and GELU are not counted (on both "
        "sides); activation quantization is, on the quantized side only: one add (the "
        "absmax or mean |x|) and, for 8 bits, one multiply per input element.",
        f"Energy counts arithmetic only (no memory access or data movement). Float MACs cost "
        f"one {fp.upper()} multiply and one add; attention and unquantized layers are {fp}.",
        "A ternary/binary weight of +-1 turns its MAC into an addition/subtraction, a zero "
        "weight into nothing. With 8-bit or 1-bit activations these are priced as INT8 adds "
        f"(as BitNet does); with float activations as {fp.upper()} adds. Each output of a "
        f"quantized layer costs one {fp.upper()} multiply to rescale.",
        f"Packed bytes: ternary codes {per_byte} per byte, binary 8 per byte, fp32 weight "
        f"scales (one per tensor, one per output channel for {per_channel}), {floats}; file "
        "headers"
        " are not counted.",
        "Resident weights: quantized layers as int8 codes (1 byte per weight: packed codes "
        "are unpacked at load and held once by the int engine, which dequantizes per call "
        "where it needs a float weight)"
        + {"fp32": ", plus an fp32 copy of the codes for the fp32 integer kernel (4 bytes per "
                   "weight of a layer with quantized activations)",
           "u8s8": ", plus a prepacked int8 copy of the codes for the u8s8 integer kernel (1 "
                   "byte per weight of a layer with quantized activations)"}.get(kernel, "")
        + f", fp32 scales, {fp} biases; all other parameters in "
        f"{fp}. Peak activations: the largest layer's {fp} input and output (for attention "
        "q, k, v and the T x T scores of every head), batch 1.",
    ]


# ---------------------------------------------------------------------------------------------
# The terminal table.
# ---------------------------------------------------------------------------------------------


def _num(x: float) -> str:
    """Three significant digits, never in exponent notation."""
    if x == 0:
        return "0"
    decimals = max(0, 2 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def _si(x: float) -> str:
    for div, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{_num(x / div)}{prefix}"
    return str(x) if isinstance(x, int) else _num(x)


def _bytes(n: float) -> str:
    for div, prefix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{_num(n / div)} {prefix}"
    return f"{int(n)} B"


def _energy_str(pj: float) -> str:
    for div, unit in ((1e6, "uJ"), (1e3, "nJ")):
        if pj >= div:
            return f"{_num(pj / div)} {unit}"
    return f"{_num(pj)} pJ"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    rule = "-" * len(line(header))
    return [line(header), rule, *[line(r) for r in body[:-1]], rule, line(body[-1])]


def _method_str(r: LayerProfile) -> str:
    if r.kind != "linear":
        return "-"
    if r.method == FULL_PRECISION:
        return FULL_PRECISION
    return f"{r.method}/a{r.act_bits if r.act_bits is not None else 'fp'}"


def _format(p: Profile) -> str:
    t = p.totals
    out = [f"bitvit profile: {p.source or 'model'} ({p.image_size}x{p.image_size} image, "
           f"batch 1, float ops in {p.float_precision})", ""]

    mem_rows = []
    for r in p.rows:
        if r.kind == "attention":
            continue
        mem_rows.append([
            r.name, _method_str(r), f"{r.params:,}",
            f"{r.info_bits_per_weight:.3g}", f"{r.stored_bits_per_weight:.3g}",
            _bytes(r.bytes_fp32), _bytes(r.bytes_fp16), _bytes(r.bytes_packed),
            _bytes(r.bytes_resident),
        ])
    mem_rows.append([
        "total", "", f"{t['params']:,}", f"{t['info_bits_per_param']:.3g}",
        f"{t['stored_bits_per_param']:.3g}", _bytes(t["bytes_fp32"]), _bytes(t["bytes_fp16"]),
        _bytes(t["bytes_packed"]), _bytes(t["bytes_resident"]),
    ])
    out.append("Memory (bits per weight: information / stored packed, float tensors packed in "
               f"{p.packed_float_dtype}; totals per parameter)")
    out += _table(["layer", "method", "params", "info b/w", "stored b/w", "fp32", "fp16",
                   "packed", "resident"], mem_rows)
    out.append("")

    ops_rows = []
    for r in p.rows:
        if r.kind == "params":
            continue
        quantized = r.weights and r.method != FULL_PRECISION
        zero = f"{r.zero_weights / r.weights:.1%}" if quantized else "-"
        ops_rows.append([
            r.name, _method_str(r) if r.kind == "linear" else p.float_precision, str(r.tokens),
            _si(r.macs), _si(r.mul_macs), _si(r.add_macs), _si(r.zero_macs), zero,
            *(_energy_str(r.energy_pj[n]) for n in NODES),
        ])
    zero_total = (f"{t['zero_weights'] / t['quantized_weights']:.1%}"
                  if t["quantized_weights"] else "-")
    ops_rows.append(["total", "", "", _si(t["macs"]), _si(t["mul_macs"]), _si(t["add_macs"]),
                     _si(t["zero_macs"]), zero_total,
                     *(_energy_str(t["energy_pj"][n]) for n in NODES)])
    out.append("Compute per image (MACs: with a multiply / additions only / zero weights: none)")
    out += _table(["layer", "method", "tokens", "MACs", "mul", "add", "zero", "zero w",
                   *(f"E {n}" for n in NODES)], ops_rows)
    out.append("")

    out.append(f"Integer kernel: {p.int_kernel}"
               + (f" ({p.int_kernel_reason})" if p.int_kernel_reason else ""))
    if p.engine:
        out.append(f"Engine auto would run this file with: {p.engine} ({p.engine_reason}); "
                   "the resident bytes are the int engine's")
    out.append(f"Resident for inference: {_bytes(t['bytes_resident'])} of weights + about "
               f"{_bytes(t['activation_bytes_peak'])} of activations per image (peak layer); "
               f"this PyTorch module, as loaded, holds {_bytes(t['bytes_held_by_module'])}.")
    out.append("")
    out.append("Arithmetic energy per image, this model vs the same architecture in "
               f"{p.float_precision}:")
    for node in NODES:
        ratio = t["energy_ratio"][node]
        out.append(f"  {node:>5}: {_energy_str(t['energy_pj'][node])} vs "
                   f"{_energy_str(t['baseline_energy_pj'][node])}"
                   + (f"  ({ratio:.3g}x less)" if ratio else ""))
    out.append(f"  ops: {', '.join(f'{k} {_si(v)}' for k, v in sorted(t['ops'].items()))}")
    out.append("")
    out.append(f"Zero weights counted from {p.weights_source}.")
    for a in p.assumptions:
        out += textwrap.wrap(a, 100, initial_indent="- ", subsequent_indent="  ")
    out += textwrap.wrap(ENERGY_SOURCE, 100)
    return "\n".join(out)
