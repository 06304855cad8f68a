"""Export a model as an ONNX graph that ONNX Runtime runs as it is (`bitvit.deploy.onnx_runtime`).

The graph is built node by node from the model's modules (`bitvit.nn.model`), not traced, so what
each quantized layer computes is spelled out here:

- full-precision linears (``nn.Linear``, the head): fp32 ``MatMul`` + ``Add``. A model without
  quantized layers gives a plain fp32 graph.
- quantized layers (`BitLinear` or `bitvit.deploy.engine.InferenceLinear`) keep their codes as an
  int8 (in, out) initializer with their fp32 scale ((1,) or (out,)) and bias:

  * 8-bit activations, ``act_quant="token"`` (BitNet's, and `bitvit.nn.quant.absmax_int8`'s):
    per token, step = max(max|x|, 1e-5) / 127; one per-axis ``QuantizeLinear`` gives uint8
    round(x / step) + 128 (half to even, as torch.round), and ``com.microsoft``
    ``MatMulIntegerToFloat`` (u8 x s8 with zero point 128, MLAS's fast kernel) scales the
    int32 products by the weight scale and the step; then the bias. The int engine
    (`InferenceLinear`) multiplies x by 127 / max|x| instead of dividing: the codes differ only
    where x * 127 / max|x| is within an ulp of a half (about 1 code in 10^6 on CIFAR-10
    activations, by one), and the products are rescaled in another order (an ulp or two).
  * 8-bit activations, ``act_quant="tensor"``: ONNX Runtime's fused ``com.microsoft``
    ``DynamicQuantizeMatMul`` (one asymmetric uint8 scale for the whole activation tensor,
    int8 codes, per-tensor or per-channel weight scale, bias): faster, approximate, and its
    scale depends on the whole batch, so an image's logits depend slightly on its batch mates.
    For q, k and v: its two halves, ``DynamicQuantizeLinear`` and ``MatMulIntegerToFloat``
    (the same numbers, bit for bit). With cls pooling the last block's proj, fc1 and fc2 see
    the cls tokens alone (below): their scale spans those, another approximation.
  * 1-bit activations: sign(x) (sign(0) = +1) as uint8 128 +- 1 through ``MatMulInteger``,
    rescaled by the token's mean|x| times the weight scale (both modes).
  * weights-only layers (``act_bits=None``): codes cast to fp32 times the scale (ONNX Runtime
    folds this into a constant at load), then ``MatMul``.
  * ``sub_norm``: a LayerNormalization without affine parameters (eps 1e-5) first.
- LayerNormalization (the model's epsilon; the final norm before or after pooling, or none),
  softmax attention, exact (erf) or tanh GELU, residuals, the cls token and position embedding,
  cls or mean pooling: as `bitvit.nn.model`, but token-major, (tokens, N, dim), from the
  patches' Transpose on. q, k and v are three products (rows of the qkv weight)
  sharing one quantization of their input, (tokens, N, heads, head_dim) each, which
  ``com.microsoft`` ``FusedMatMul`` reads as (N, heads, tokens, head_dim) in place
  (``transBatchA/B``): a block's one Transpose is its attention output's, to token-major.
  With cls pooling the last block computes the cls token's output only: its q from the cls
  rows of the quantized input that k and v (every token) share, then (1, N, dim) on.

Input ``images``: float32 (N, C, S, S), normalized
(`bitvit.deploy.preprocessing.Preprocessing`); output ``logits`` (N, classes); N is dynamic.
The graph's ``metadata_props`` hold ``format`` ("bitvit-onnx"), ``format_version``,
``act_quant``, ``method`` and, for files written by `export_onnx` (``bitvit export --format
onnx``), the config, class names and preprocessing that the safetensors export records
(`bitvit.deploy.export.model_metadata`).

onnx and onnxruntime are optional (``pip install -e ".[onnx]"``): imported on use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bitvit import __version__
from bitvit.deploy.export import ExportedModel, model_metadata
from bitvit.deploy.onnx_runtime import ONNX_FORMAT, ONNX_FORMAT_VERSION, import_optional
from bitvit.nn.methods import FULL_PRECISION
from bitvit.nn.model import Attention, Block, Mlp, VisionTransformer
from bitvit.nn.quant import EPS, BitLinear

ACT_QUANTS = ("token", "tensor")
OPSET = 17  # LayerNormalization; ReduceMax/ReduceMean still take axes as an attribute
BATCH = "N"  # the graph's symbolic batch axis


@dataclass
class _Linear:
    """What the graph needs of one linear layer; codes None means a float weight."""

    weight: np.ndarray | None  # fp32 (out, in), float layers only
    codes: np.ndarray | None  # int8 (out, in)
    scale: np.ndarray | None  # fp32 (1,) or (out,)
    bias: np.ndarray | None
    act_bits: int | None = None
    sub_norm: bool = False
    method: str = FULL_PRECISION

    @property
    def shape(self) -> tuple[int, int]:  # (out, in)
        return (self.weight if self.codes is None else self.codes).shape


def _numpy(t: torch.Tensor | None, dtype: type) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().to(torch.float32 if dtype is np.float32
                                                        else torch.int8).numpy().astype(dtype)


def _describe(layer: nn.Module, name: str) -> _Linear:
    from bitvit.deploy.engine import InferenceLinear

    bias = _numpy(layer.bias, np.float32)
    if isinstance(layer, BitLinear):
        codes, scale = layer.quantized_weight()
    elif isinstance(layer, InferenceLinear):
        codes, scale = layer.codes, layer.scale
    elif isinstance(layer, nn.Linear):
        return _Linear(_numpy(layer.weight, np.float32), None, None, bias)
    else:
        raise ValueError(f"{name}: a {type(layer).__name__} is not a linear layer the ONNX "
                         "export knows (nn.Linear, BitLinear, InferenceLinear)")
    return _Linear(None, _numpy(codes, np.int8), _numpy(scale.reshape(-1), np.float32), bias,
                   layer.act_bits, layer.sub_norm, layer.method)


class _Graph:
    """Nodes and initializers, with unique names and shared scalar constants."""

    def __init__(self, onnx: Any) -> None:
        self.helper, self.numpy_helper = onnx.helper, onnx.numpy_helper
        self.nodes: list = []
        self.initializers: list = []
        self.value_info: list = []
        self._used: set[str] = set()
        self._scalars: dict[tuple, str] = {}
        self._shared: dict[tuple, str] = {}

    def _unique(self, name: str) -> str:
        base, i = name, 1
        while name in self._used:
            name, i = f"{base}_{i}", i + 1
        self._used.add(name)
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        name = self._unique(name)
        self.initializers.append(self.numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def scalar(self, value: float | int, dtype: type = np.float32, shape: tuple = ()) -> str:
        key = (value, np.dtype(dtype).name, shape)
        if key not in self._scalars:
            self._scalars[key] = self.const(f"const_{np.dtype(dtype).name}_{value}".replace(
                "-", "m").replace(".", "p"), np.full(shape, value, dtype=dtype))
        return self._scalars[key]

    def shared(self, key: tuple, build: Callable[[], str]) -> str:
        """The tensor stored under ``key``, built by ``build()`` the first time."""
        if key not in self._shared:
            self._shared[key] = build()
        return self._shared[key]

    def op(self, op_type: str, inputs: Sequence[str], name: str, domain: str = "",
           **attrs: Any) -> str:
        out = self._unique(name)
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], name=out,
                                                domain=domain or None, **attrs))
        return out

    def declare(self, name: str, shape: Sequence[int | str]) -> str:
        """Record float ``name``'s shape: a Reshape's -1 leaves the batch axis anonymous, and ORT
        fuses an Add into a LayerNormalization only where both operands' axes match."""
        self.value_info.append(self.helper.make_tensor_value_info(name, 1, list(shape)))
        return name

    def op_n(self, op_type: str, inputs: Sequence[str], name: str,
             outputs: Sequence[str]) -> list[str]:  # outputs named {name}.{output}
        outs = [self._unique(f"{name}.{o}") for o in outputs]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), outs,
                                                name=self._unique(name)))
        return outs


def _layer_norm(g: _Graph, x: str, name: str, norm: nn.LayerNorm | None, dim: int) -> str:
    """LayerNormalization over the last axis; ``norm`` None: no affine parameters, eps 1e-5."""
    if norm is None:
        weight, bias, eps = np.ones(dim, np.float32), np.zeros(dim, np.float32), EPS
    else:
        weight, bias, eps = (*(_numpy(t, np.float32) for t in (norm.weight, norm.bias)), norm.eps)
    return g.op("LayerNormalization", [x, g.const(f"{name}.weight", weight),
                                       g.const(f"{name}.bias", bias)], name, axis=-1,
                epsilon=float(eps))


def _first(g: _Graph, t: str, end: str | None = None) -> str:
    """t[:1] along axis 0 (the first token, its axis kept), or t[:end]; one Slice per t."""
    return g.shared(("first", t), lambda: g.op("Slice", [
        t, g.scalar(0, np.int64, (1,)), end or g.scalar(1, np.int64, (1,))], f"{t}.first"))


def _batch(g: _Graph, x: str, axis: int = 1) -> str:
    """The batch size, (1,) int64, from x's batch ``axis`` (token-major: 1); one per graph."""
    return g.shared(("batch",), lambda: g.op("Shape", [x], "batch", start=axis, end=axis + 1))


def _token_int8(g: _Graph, x: str, name: str, parts: list[_Linear], names: list[str],
                tokens: int | None, firsts: list[bool]) -> list[str]:
    """8-bit per-token activations (`quant.absmax_int8`) through two fused ONNX Runtime kernels.

    The tokens are flattened to rows (M, K): per-axis ``QuantizeLinear`` (axis 0) divides each
    row by its step m / 127, m = max(max|x|, EPS), rounds half to even and adds the zero point
    128 (uint8) in one pass; ``com.microsoft.MatMulIntegerToFloat`` multiplies (u8 x s8) and
    scales the int32 products by the weight scale and, given an (M, 1) ``a_scale``, by the
    step, in place of Cast + Mul over the output. That kernel scales a fused bias too, so the
    bias is a separate Add. One quantization feeds every part's product; a part in ``firsts``
    takes the first token's rows of it, the first B of the token-major rows (x (tokens, B, K)).
    """
    n_in = parts[0].shape[1]
    rows = g.op("Reshape", [x, g.const(f"{name}.rows_shape", np.array([-1, n_in], np.int64))],
                f"{name}.rows")  # tokens None: x is (M, K) already
    # max|x| as max(max x, -min x): two reads of the rows and no |x| written back (an Abs
    # pass was a tenth of the per-token graph's time at batch 256).
    absmax = g.op("Max", [g.op("ReduceMax", [rows], f"{name}.rowmax", axes=[-1], keepdims=1),
                          g.op("Neg", [g.op("ReduceMin", [rows], f"{name}.rowmin", axes=[-1],
                                                keepdims=1)], f"{name}.neg_rowmin")],
                  f"{name}.absmax")
    step = g.op("Div", [g.op("Max", [absmax, g.scalar(EPS)], f"{name}.absmax_clamped"),
                        g.scalar(127.0)], f"{name}.act_step")  # (M, 1): x ~ q * step
    # Per-axis QuantizeLinear takes a 1-D scale and a zero point of the same length, M; every
    # input with the same static token count has the same M (tokens * B): one zero point.
    step_1d = g.op("Reshape", [step, g.scalar(-1, np.int64, (1,))], f"{name}.act_step_1d")
    zero = g.shared(("zero_point", tokens or name), lambda: g.op("Expand", [
        g.scalar(128, np.uint8), g.op("Shape", [step_1d], f"{name}.m")], f"{name}.zero_point"))
    u = g.op("QuantizeLinear", [rows, step_1d, zero], f"{name}.q_u8", axis=0)
    outs = []
    for lin, part, first in zip(parts, names, firsts, strict=True):
        codes_t, scale = _weights(g, lin, part)
        a, a_step = (_first(g, t, _batch(g, x)) for t in (u, step)) if first else (u, step)
        y = g.op("MatMulIntegerToFloat", [a, codes_t, a_step, scale, g.scalar(128, np.uint8)],
                 f"{part}.matmul", domain="com.microsoft")
        if tokens is not None:  # back to (tokens, B, n_out) (first: 1 token) before the bias:
            # a constant shape lets ORT fuse the bias Add with fc1's GELU (BiasGelu).
            out = [1 if first else tokens, -1, lin.shape[0]]
            y = g.declare(g.op("Reshape", [y, g.const(f"{part}.out_shape", np.array(
                out, np.int64))], f"{part}.unflattened"), [out[0], BATCH, out[2]])
        outs.append(_bias(g, y, lin, part))
    return outs


def _weights(g: _Graph, lin: _Linear, name: str) -> tuple[str, str]:
    """A quantized layer's int8 (in, out) codes and fp32 scale as initializers."""
    return g.const(f"{name}.codes_t", lin.codes.T), g.const(f"{name}.scale", lin.scale)


def _bias_const(g: _Graph, lin: _Linear, name: str) -> str | None:
    return None if lin.bias is None else g.const(f"{name}.bias", lin.bias)


def _linear(g: _Graph, x: str, layer: nn.Module, name: str, act_quant: str,
            tokens: int | None = None) -> str:
    """``layer`` on x. ``tokens``: x's static token count, x (tokens, B, in), which lets ONNX
    Runtime fuse the per-token path with what follows; None: x (M, in) (the head)."""
    return _linears(g, x, layer, name, act_quant, tokens)[0]


def _linears(g: _Graph, x: str, layer: nn.Module, name: str, act_quant: str,
             tokens: int | None = None, parts: Sequence[str] = (),
             first: Sequence[str] = ()) -> list[str]:
    """``layer`` on x; with ``parts`` (names: q, k, v), its output in that many equal slices
    (rows of the weight), each its own product, all from one quantization of x: no slicing
    of a (..., parts * out) product along its last axis (a strided copy). The parts named in
    ``first`` take x's first token only, x (tokens, B, in): (1, B, out), from the same
    quantized x (the same numbers as that token's row of the whole product, in every mode)."""
    lin = _describe(layer, name)
    if lin.sub_norm:
        x = _layer_norm(g, x, f"{name}.sub_norm", None, lin.shape[1])
    lins = [_rows(lin, i, len(parts)) for i in range(len(parts))] if parts else [lin]
    names = [f"{name}.{p}" for p in parts] or [name]
    firsts = [p in first for p in parts] or [False]
    if lin.codes is None or lin.act_bits is None:
        def product(part: _Linear, n: str, first: bool) -> str:
            if part.codes is None:
                w = g.const(f"{n}.weight_t", part.weight.T)
            else:  # codes * scale (InferenceLinear.dequantized_weight): ORT folds it at load
                codes_t, scale = _weights(g, part, n)
                w = g.op("Mul", [g.op("Cast", [codes_t], f"{n}.codes_f", to=1), scale],
                         f"{n}.weight_t")
            return _bias(g, g.op("MatMul", [_first(g, x) if first else x, w], f"{n}.matmul"),
                         part, n)
    elif lin.act_bits == 8 and act_quant == "token":
        return _token_int8(g, x, name, lins, names, tokens, firsts)
    elif lin.act_bits == 8 and not parts:
        def product(part: _Linear, n: str, first: bool) -> str:
            # Symmetric codes: no weight zero point (an empty name skips the optional input).
            codes_t, scale = _weights(g, part, n)
            bias = _bias_const(g, part, n)
            return g.op("DynamicQuantizeMatMul", [x, codes_t, scale, ""]
                        + ([bias] if bias else []), f"{n}.dq_matmul", domain="com.microsoft")
    elif lin.act_bits == 8:
        # DynamicQuantizeMatMul's two halves (its arithmetic, bit for bit), x quantized once.
        u, step, zero = g.op_n("DynamicQuantizeLinear", [x], f"{name}.dq",
                               ["q_u8", "step", "zero_point"])

        def product(part: _Linear, n: str, first: bool) -> str:
            codes_t, scale = _weights(g, part, n)
            bias = _bias_const(g, part, n)
            return g.op("MatMulIntegerToFloat", [_first(g, u) if first else u, codes_t, step,
                                                 scale, zero, ""]
                        + ([bias] if bias else []), f"{n}.matmul", domain="com.microsoft")
    else:
        # 1 bit: sign(x) (sign(0) = +1) as 128 +- 1; scale 1 / mean|x| (InferenceLinear).
        u = g.op("Where", [g.op("GreaterOrEqual", [x, g.scalar(0.0)], f"{name}.nonneg"),
                           g.scalar(129, np.uint8), g.scalar(127, np.uint8)], f"{name}.q_u8")
        mean = g.op("ReduceMean", [g.op("Abs", [x], f"{name}.abs")], f"{name}.absmean",
                    axes=[-1], keepdims=1)
        row = g.op("Div", [g.scalar(1.0), mean], f"{name}.act_scale")

        def product(part: _Linear, n: str, first: bool) -> str:
            codes_t, scale = _weights(g, part, n)
            a, a_row = (_first(g, u), _first(g, row)) if first else (u, row)
            acc = g.op("MatMulInteger", [a, codes_t, g.scalar(128, np.uint8)], f"{n}.acc")
            ratio = g.op("Div", [scale, a_row], f"{n}.ratio")  # quant.rescale's order
            return _bias(g, g.op("Mul", [g.op("Cast", [acc], f"{n}.acc_f", to=1), ratio],
                                 f"{n}.rescaled"), part, n)
    return [product(*args) for args in zip(lins, names, firsts, strict=True)]


def _bias(g: _Graph, y: str, lin: _Linear, name: str) -> str:
    bias = _bias_const(g, lin, name)
    return y if bias is None else g.op("Add", [y, bias], f"{name}.out")


def _rows(lin: _Linear, i: int, parts: int) -> _Linear:
    """Output rows [i * out / parts, (i + 1) * out / parts) of ``lin`` (q, k, v of a qkv layer,
    in that order: `bitvit.nn.model.Attention`), with their per-channel scales."""
    n = lin.shape[0] // parts
    weight, codes, bias = (None if a is None else a[i * n:(i + 1) * n]
                           for a in (lin.weight, lin.codes, lin.bias))
    scale = lin.scale if lin.scale is None or lin.scale.size == 1 else lin.scale[i * n:(i + 1) * n]
    return replace(lin, weight=weight, codes=codes, bias=bias, scale=scale)


def _gelu(g: _Graph, x: str, name: str, approximate: str = "none") -> str:
    """Exact GELU, x * 0.5 * (1 + erf(x / sqrt 2)) (nn.GELU's default), which ORT fuses to Gelu;
    ``approximate="tanh"``: x * 0.5 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))), as
    nn.GELU(approximate="tanh") (model.gelu=tanh)."""
    if approximate == "tanh":
        cube = g.op("Mul", [g.op("Mul", [x, x], f"{name}.sq"), x], f"{name}.cube")
        poly = g.op("Add", [x, g.op("Mul", [cube, g.scalar(0.044715)], f"{name}.cubic")],
                    f"{name}.poly")
        t = g.op("Tanh", [g.op("Mul", [poly, g.scalar(math.sqrt(2.0 / math.pi))],
                               f"{name}.scaled")], f"{name}.tanh")
        inner = g.op("Add", [t, g.scalar(1.0)], f"{name}.add")
    else:
        erf = g.op("Erf", [g.op("Div", [x, g.scalar(math.sqrt(2.0))], f"{name}.div")],
                   f"{name}.erf")
        inner = g.op("Add", [erf, g.scalar(1.0)], f"{name}.add")
    return g.op("Mul", [g.op("Mul", [x, inner], f"{name}.mul"), g.scalar(0.5)], name)


def _attention(g: _Graph, x: str, attn: Attention, name: str, dim: int, act_quant: str,
               tokens: int, cls_only: bool = False) -> str:
    """Attention on token-major x (n, B, C). ``FusedMatMul``'s ``transBatchA/B`` read (d0, b...,
    r, c) as (b..., d0, c) by strides (lda = c * prod(b): ORT's MatMulComputeHelper), so q, k,
    v (n, B, h, hd) as (B, h, n, hd): the output's Transpose is the one data move.
    ``cls_only``: the first token's output only, (1, B, C): its query against every key."""
    head_dim, rows = dim // attn.heads, 1 if cls_only else tokens
    heads = g.const(f"{name}.heads_shape", np.array([0, 0, attn.heads, head_dim], np.int64))
    q, k, v = (g.op("Reshape", [t, heads], f"{name}.{p}_heads") for p, t in zip(
        "qkv", _linears(g, x, attn.qkv, f"{name}.qkv", act_quant, tokens, "qkv",
                        "q" if cls_only else ()), strict=True))
    # FusedMatMul's outputs are declared: ONNX shape inference does not know the contrib op,
    # and tools that need every tensor's type (quantize_dynamic) stop there otherwise.
    scores = g.declare(g.op("FusedMatMul", [q, k], f"{name}.scores", domain="com.microsoft",
                            transBatchA=1, transBatchB=1, transB=1,
                            alpha=1.0 / math.sqrt(head_dim)), [BATCH, attn.heads, rows, tokens])
    weights = g.op("Softmax", [scores], f"{name}.softmax", axis=-1)  # (B, h, rows, n)
    out = g.declare(g.op("FusedMatMul", [weights, v], f"{name}.av", domain="com.microsoft",
                         transBatchB=1), [BATCH, attn.heads, rows, head_dim])
    out = g.op("Transpose", [out], f"{name}.av_t", perm=[2, 0, 1, 3])  # (rows, B, h, hd)
    out = g.op("Reshape", [out, g.const(f"{name}.merge_shape", np.array([0, 0, dim], np.int64))],
               f"{name}.merged")
    return _linear(g, out, attn.proj, f"{name}.proj", act_quant, rows)


def _mlp(g: _Graph, x: str, mlp: Mlp, name: str, act_quant: str, tokens: int) -> str:
    if not isinstance(mlp.act, nn.GELU) or mlp.act.approximate not in ("none", "tanh"):
        raise ValueError(f"{name}.act: the ONNX export writes GELU (exact or tanh), got {mlp.act}")
    h = _gelu(g, _linear(g, x, mlp.fc1, f"{name}.fc1", act_quant, tokens), f"{name}.gelu",
              mlp.act.approximate)
    return _linear(g, h, mlp.fc2, f"{name}.fc2", act_quant, tokens)


def _block(g: _Graph, x: str, block: Block, name: str, dim: int, act_quant: str,
           tokens: int, cls_only: bool = False) -> str:
    """A block on x (n, B, C); ``cls_only``: its first token's output only, (1, B, C) (keys
    and values still from every token), as the last block with cls pooling needs."""
    a = _attention(g, _layer_norm(g, x, f"{name}.norm1", block.norm1, dim), block.attn,
                   f"{name}.attn", dim, act_quant, tokens, cls_only)
    x, tokens = (_first(g, x), 1) if cls_only else (x, tokens)
    x = g.op("Add", [x, a], f"{name}.res1")
    m = _mlp(g, _layer_norm(g, x, f"{name}.norm2", block.norm2, dim), block.mlp, f"{name}.mlp",
             act_quant, tokens)
    return g.op("Add", [x, m], f"{name}.res2")


def _vit_graph(g: _Graph, vit: VisionTransformer, act_quant: str) -> str:
    """The model on (N, C, S, S) images, its residual stream token-major: (tokens, N, dim)."""
    c = vit.config
    p, grid, dim = c.patch_size, c.image_size // c.patch_size, c.dim
    # PatchEmbed: (N, C, H, W) -> (H/p * W/p, N, C * p * p), patches in row-major order.
    x = g.op("Reshape", ["images", g.const("patch_shape", np.array(
        [0, c.in_channels, grid, p, grid, p], np.int64))], "patches")
    x = g.op("Transpose", [x], "patches_t", perm=[2, 4, 0, 1, 3, 5])
    x = g.declare(g.op("Reshape", [x, g.const("tokens_shape", np.array(
        [grid * grid, -1, c.in_channels * p * p], np.int64))], "tokens"),
        [grid * grid, BATCH, c.in_channels * p * p])
    tokens = grid * grid
    x = _linear(g, x, vit.patch_embed.proj, "patch_embed.proj", act_quant, tokens)
    cls = vit.cls_token is not None
    if cls:
        shape = g.op("Concat", [g.scalar(1, np.int64, (1,)), _batch(g, "images", 0),
                                g.scalar(dim, np.int64, (1,))], "cls_shape", axis=0)
        x = g.op("Concat", [g.op("Expand", [g.const("cls_token", _numpy(
            vit.cls_token, np.float32)), shape], "cls_tokens"), x], "with_cls", axis=0)
        tokens += 1
    pos = _numpy(vit.pos_embed, np.float32).reshape(tokens, 1, dim)
    x = g.op("Add", [x, g.const("pos_embed", pos)], "embedded")
    for i, block in enumerate(vit.blocks):
        x = _block(g, x, block, f"blocks.{i}", dim, act_quant, tokens,
                   cls and i == len(vit.blocks) - 1)
    x = _first(g, x) if cls and not vit.blocks else x
    if c.final_norm == "tokens":
        x = _layer_norm(g, x, "norm", vit.norm, dim)
    x = (g.op("Squeeze", [x, g.scalar(0, np.int64, (1,))], "pooled") if cls else
         g.op("ReduceMean", [x], "pooled", axes=[0], keepdims=0))
    if c.final_norm == "pooled":  # (N, dim): the norm after pooling (timm's fc_norm)
        x = _layer_norm(g, x, "norm", vit.norm, dim)
    return _linear(g, x, vit.head, "head", act_quant)


def _the_vit(model: nn.Module) -> VisionTransformer:
    vit = model.vit if isinstance(model, ExportedModel) else model
    vit = getattr(vit, "_orig_mod", vit)  # a torch.compile wrapper
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"to_onnx exports a VisionTransformer or an ExportedModel, got "
                         f"{type(model).__name__}")
    return vit


def onnx_model(model: nn.Module, act_quant: str = "token",
               metadata: dict[str, str] | None = None) -> Any:
    """``model`` (a `VisionTransformer`, quantized or not, or an `ExportedModel`) as an ONNX
    ``ModelProto`` in memory, checked with ``onnx.checker`` (see `to_onnx`, which writes it).
    ``proto.SerializeToString()`` is what ``onnxruntime.InferenceSession`` and
    `bitvit.deploy.onnx_runtime.OrtModel` take."""
    onnx = import_optional("onnx")
    if act_quant not in ACT_QUANTS:
        raise ValueError(f"unknown act_quant {act_quant!r}: expected one of "
                         f"{', '.join(ACT_QUANTS)}")
    vit = _the_vit(model)
    c = vit.config
    g = _Graph(onnx)
    logits = _vit_graph(g, vit, act_quant)
    methods = sorted({m.method for m in vit.modules() if hasattr(m, "act_bits")
                      and hasattr(m, "method")})
    h = onnx.helper
    graph = h.make_graph(
        g.nodes, "bitvit", [h.make_tensor_value_info(
            "images", onnx.TensorProto.FLOAT, [BATCH, c.in_channels, c.image_size, c.image_size])],
        [h.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, [BATCH, c.num_classes])],
        g.initializers, value_info=g.value_info)
    opsets = [h.make_opsetid("", OPSET)]  # the graph is written for this opset alone
    if any(n.domain == "com.microsoft" for n in g.nodes):
        opsets.append(h.make_opsetid("com.microsoft", 1))
    proto = h.make_model(graph, opset_imports=opsets, producer_name="bitvit",
                         producer_version=__version__)
    proto.ir_version = min(proto.ir_version, 9)  # what ONNX Runtime 1.18 reads
    # Renaming the output in place would leave its producer's name dangling: an Identity.
    proto.graph.node.append(h.make_node("Identity", [logits], ["logits"], name="logits"))
    proto.graph.output[0].name = "logits"
    meta = {**(metadata or {}), "format": ONNX_FORMAT, "format_version": ONNX_FORMAT_VERSION,
            "act_quant": act_quant, "method": ",".join(methods) or FULL_PRECISION}
    h.set_model_props(proto, meta)
    onnx.checker.check_model(proto)
    return proto


def to_onnx(model: nn.Module, path: str | Path, act_quant: str = "token",
            metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` (a `VisionTransformer`, quantized or not, or an `ExportedModel`) as ONNX.

    ``act_quant``: ``token`` (per-token absmax int8, BitNet's arithmetic) or ``tensor``
    (ONNX Runtime's per-tensor ``DynamicQuantizeMatMul``: faster, approximate); ignored for
    layers without 8-bit activations. ``metadata``: extra string entries for the graph's
    ``metadata_props`` (`export_onnx` adds the config, classes and preprocessing). The file is
    written atomically and checked with ``onnx.checker``. Returns the path. `onnx_model` builds
    the same graph in memory.
    """
    from bitvit.files import atomic_file

    onnx = import_optional("onnx")
    proto = onnx_model(model, act_quant, metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_file(path, lambda tmp: onnx.save_model(proto, str(tmp)))


def export_onnx(src: str | Path, out: str | Path, best: bool = False,
                act_quant: str = "token") -> Path:
    """Export a run folder, checkpoint folder or model.safetensors checkpoint as ONNX, with the
    config, class names and preprocessing in its metadata (what
    `bitvit.deploy.onnx_runtime.load_onnx` reads back)."""
    from bitvit.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(src, best)
    if len(ckpt.classes) != ckpt.config.model.num_classes:
        raise ValueError(f"{len(ckpt.classes)} class names for a model with "
                         f"{ckpt.config.model.num_classes} classes")
    return to_onnx(ckpt.model.eval(), out, act_quant,
                   metadata=model_metadata(ckpt.config, ckpt.classes))
