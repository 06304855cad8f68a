"""Low-bit weight and activation quantizers, the quantized linear layer, and `quantize_`.

Every weight method is one row of `bitvit.nn.methods.METHOD_TABLE` (plain data, torch-free); a row
names its quantizer, a key of `QUANTIZERS`, and its STE, a key of `STES`, both checked here at
import. ``codes * scale`` is the weight the forward pass uses; in every binary method
sign(0) = +1, so codes are never 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bitvit.nn.kernels import (  # noqa: F401 - int_mm, pad_for_int_mm: re-exported, their old home
    fp32_mm,
    int_matmul,
    int_mm,
    kernel_name,
    pad_for_int_mm,
)
from bitvit.nn.methods import (
    ACT_BITS,
    FULL_PRECISION,
    METHOD_TABLE,
    QUANTIZER_GRANULARITIES,
    WHERE_NAMES,
    QuantMethod,
)

WHERE = WHERE_NAMES
EPS = 1e-5


def check_method(method: str) -> str:
    if method not in METHOD_TABLE:
        raise ValueError(
            f"unknown quantization method {method!r}: expected one of {', '.join(METHOD_TABLE)} "
            f"({FULL_PRECISION!r} means no quantization and has no quantizer)"
        )
    return method


def resolve_act_bits(method: str, act_bits: int | str | None) -> int | None:
    """Turn the user's act_bits ('default', 'none', 8, 1, None) into 8, 1 or None."""
    if act_bits == "default":
        return METHOD_TABLE[check_method(method)].default_act_bits
    if isinstance(act_bits, str) and act_bits.lower() == "none":
        return None
    if isinstance(act_bits, str) and act_bits.isdigit():
        act_bits = int(act_bits)
    if isinstance(act_bits, bool) or act_bits not in ACT_BITS:  # True == 1, but not 1 bit
        raise ValueError(f"unknown act_bits {act_bits!r}: expected 8, 1, none or default")
    return act_bits


def sign_nonzero(x: torch.Tensor) -> torch.Tensor:
    """sign(x) with sign(0) = +1, so a binary code is always -1 or +1."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Weight quantizers: pure functions of the latent weight.
# ---------------------------------------------------------------------------------------------


def _row_absmean(w: torch.Tensor) -> torch.Tensor:
    """mean_i |W[o, i]| per output channel, shaped (out, 1, ...) to broadcast against w."""
    return w.abs().flatten(1).mean(dim=1).reshape((-1,) + (1,) * (w.dim() - 1))


def _absmean(w: torch.Tensor, granularity: str) -> torch.Tensor:
    """The scale mean|W| at ``granularity``: 1 (none), per tensor or per output channel."""
    if granularity == "none":
        return torch.ones((1,) * w.dim(), device=w.device)
    if granularity == "tensor":
        return w.abs().mean().reshape((1,) * w.dim())
    return _row_absmean(w)


def _only(granularity: str, quantizer: str) -> None:
    # Table rows are checked when made (bitvit.nn.methods); this guards direct calls.
    allowed = QUANTIZER_GRANULARITIES[quantizer]
    if granularity not in allowed:
        raise ValueError(f"quantizer {quantizer!r}: granularity={granularity!r}, "
                         f"expected {' or '.join(allowed)}")


def _absmean_ternary(w: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    gamma = _absmean(w, granularity)
    return (w / (gamma + EPS)).round_().clamp_(-1, 1), gamma


def _twn_threshold(w: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    # Li et al. (2016): threshold 0.7 * mean|W| per channel, scale = mean |W| above it.
    _only(granularity, "twn_threshold")
    a = w.abs()
    kept = a > 0.7 * _row_absmean(w)
    codes = torch.sign(w) * kept  # |W| > threshold >= 0, so sign(W) is never 0 here
    count = kept.flatten(1).sum(dim=1).clamp_(min=1)  # a row with nothing kept gets scale 0
    scale = (a * kept).flatten(1).sum(dim=1) / count
    return codes, scale.reshape((-1,) + (1,) * (w.dim() - 1))


def _centred_sign(w: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    _only(granularity, "centred_sign")
    return sign_nonzero(w - w.mean()), _absmean(w, granularity)


def _sign(w: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    return sign_nonzero(w), _absmean(w, granularity)


# (fp32 weight (out, in, ...), the row's granularity) -> (codes, scale); a row of METHOD_TABLE
# names one of these. The scale has the weight's number of dimensions.
Quantizer = Callable[[torch.Tensor, str], tuple[torch.Tensor, torch.Tensor]]
QUANTIZERS: dict[str, Quantizer] = {
    "absmean_ternary": _absmean_ternary,
    "twn_threshold": _twn_threshold,
    "centred_sign": _centred_sign,
    "sign": _sign,
}


def quantize_weights(weight: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight (out, in, ...) to int8 ``codes`` and a float32 ``scale``.

    ``codes * scale`` is the weight the forward pass uses. The scale has the weight's number of
    dimensions: all ones for a per-tensor scale, ``(out, 1, ...)`` per output channel.
    """
    spec = METHOD_TABLE[check_method(method)]
    codes, scale = QUANTIZERS[spec.quantizer](weight.detach().float(), spec.granularity)
    return codes.to(torch.int8), scale.float()


def dequantize_weights(weight: torch.Tensor, method: str) -> torch.Tensor:
    """The weight the forward pass uses (``codes * scale``), in the latent weight's dtype."""
    codes, scale = quantize_weights(weight, method)
    return (codes * scale).to(weight.dtype)


# ---------------------------------------------------------------------------------------------
# Activation quantizers (per token: over the last dimension).
# ---------------------------------------------------------------------------------------------


def absmax_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`absmax_int8`'s codes before the int8 cast: integer-valued float32, ``|q| <= 127``.

    What the fp32 integer kernel (`bitvit.nn.kernels`) multiplies, without an int8 round trip.
    """
    x = x.detach().float()
    # max|x| as max(-min x, max x): no |x| temporary (torch.aminmax is far slower on CPU).
    absmax = torch.maximum(x.amin(dim=-1, keepdim=True).neg_(), x.amax(dim=-1, keepdim=True))
    s = 127.0 / absmax.clamp_(min=EPS)
    # |x * s| <= 127 (up to an ulp), so the clamp to [-128, 127] is implied by the round.
    return (x * s).round_(), s


def absmax_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8: q = clamp(round(x * s), -128, 127), s = 127 / max|x|.

    Returns ``(q, s)`` with q int8 and s float32 of shape (..., 1); x is approximately q / s,
    with an error per element of at most max(max|x|, EPS) / 254: max|x| is clamped to at least
    EPS, as BitNet does, so a token whose values all lie below EPS is quantized on EPS's grid
    (below about EPS / 254 it becomes 0). Training and the inference engine share this
    function, so both round every element alike.
    """
    q, s = absmax_codes(x)
    return q.to(torch.int8), s


def quantize_activations(x: torch.Tensor, bits: int | None) -> torch.Tensor:
    """Fake-quantize activations (no gradient rule; see `BitLinear` for that)."""
    if bits is None:
        return x
    if bits == 8:
        q, s = absmax_int8(x)
        return (q / s).to(x.dtype)
    if bits == 1:
        # The fully binary variant: sign(x) times the token's mean |x|.
        return sign_nonzero(x) * x.abs().mean(dim=-1, keepdim=True)
    raise ValueError(f"unknown act_bits {bits!r}: expected 8, 1 or None")


# ---------------------------------------------------------------------------------------------
# Straight-through estimators.
# ---------------------------------------------------------------------------------------------


class _IdentitySTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_q):  # noqa: ANN001 - autograd signature
        return x_q

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        return grad, None


class _ClippedSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_q):  # noqa: ANN001 - autograd signature
        ctx.save_for_backward(x)
        return x_q

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1), None


def ste_identity(x: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
    """Forward x_q, backward identity (BitNet's STE)."""
    return _IdentitySTE.apply(x, x_q.detach())


def ste_clipped(x: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
    """Forward x_q, backward 1{|x| <= 1} (BinaryConnect / XNOR-Net)."""
    return _ClippedSTE.apply(x, x_q.detach())


STES = {"identity": ste_identity, "clipped": ste_clipped}


def check_table(table: Mapping[str, QuantMethod]) -> None:
    """Every row is a `QuantMethod` under its own name whose quantizer and STE exist here (and
    every quantizer here says which granularities it computes)."""
    if set(QUANTIZERS) != set(QUANTIZER_GRANULARITIES):
        raise ValueError(f"bitvit.nn.quant.QUANTIZERS ({', '.join(QUANTIZERS)}) and "
                         f"bitvit.nn.methods.QUANTIZER_GRANULARITIES "
                         f"({', '.join(QUANTIZER_GRANULARITIES)}) name different quantizers")
    for key, spec in table.items():
        if not isinstance(spec, QuantMethod) or spec.name != key:
            raise ValueError(f"METHOD_TABLE[{key!r}] is not a QuantMethod named {key!r}")
        for field, known in (("quantizer", QUANTIZERS), ("ste", STES)):
            if getattr(spec, field) not in known:
                raise ValueError(f"METHOD_TABLE[{key!r}]: {field}={getattr(spec, field)!r}, "
                                 f"expected one of {', '.join(known)}")


def weight_ste(method: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The method's straight-through estimator for its weight."""
    return STES[METHOD_TABLE[method].ste]


check_table(METHOD_TABLE)
METHODS = tuple(METHOD_TABLE)


RESCALE_SLAB = 1 << 18  # elements per slab of rows: a 1 MiB fp32 temporary, cache-sized


def rescale(acc: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    """Integer products back to fp32: ``acc * (col_scale / row_scale) + bias``.

    ``acc`` is either kernel's result (`bitvit.nn.kernels`): int32, or fp32 holding the same
    integers exactly; both give identical values. ``row_scale`` (M, 1) is the activation scale
    s (x ~ q / s), ``col_scale`` (1,) or (N,) the weight scale. Eagerly it runs a slab of rows
    at a time into one output: the (M, N) ratio, and the fp32 copy of int32 products that torch
    makes on the CPU, would each be as large as the output (the strong preset's batch of 256
    peaked at 1.5x fp32's memory); a slab's are small, and every element is computed as in one
    pass. Under torch.compile it is one expression, which the compiler fuses.
    """
    col = col_scale.reshape(1, -1)
    rows = acc.shape[0]
    step = rows if torch.compiler.is_compiling() else max(1, RESCALE_SLAB // max(1, acc.shape[1]))
    if rows <= step:
        return _scale_rows(acc, col / row_scale, bias)
    out = torch.empty(acc.shape, dtype=torch.float32, device=acc.device)
    for start in range(0, rows, step):
        part = slice(start, start + step)
        _scale_rows(acc[part], col / row_scale[part], bias, out=out[part])
    return out


def _scale_rows(acc: torch.Tensor, ratio: torch.Tensor, bias: torch.Tensor | None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    return (torch.mul(acc, ratio, out=out) if bias is None
            else torch.addcmul(bias, acc, ratio, out=out))


class _Int8Linear(torch.autograd.Function):
    """y = (q @ codes^T) * scale / s + bias, with exact integer products.

    The same function and gradients as the fake-quantized F.linear (identity STE for both
    the activations and the weights), only faster: the products of small integers are exact.
    ``kernel`` (`bitvit.nn.kernels`): ``int8`` (int8 x int8 -> int32), ``u8s8`` (oneDNN's
    u8 x s8 product -> fp32) or ``fp32`` (the same integers as floats); all give identical
    outputs and gradients. For backward, ``int8`` and ``u8s8`` save the activation codes as
    int8 (1 byte each), ``fp32`` as the float codes it multiplied (4 bytes each, as much as the
    fake-quant path's saved input).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, codes, scale, kernel):  # noqa: ANN001 - autograd
        if kernel in ("int8", "u8s8"):
            q, s = absmax_int8(x)  # saved as int8: 1 byte per activation
            q2 = q.reshape(-1, q.shape[-1])
            # u8s8 prepacks the weight on every call, as it changes every step. Measured on
            # one AVX2-capped core: prepack + product still beat fp32's product, 1.1x on a
            # 512-token slab and 2x on a 128-image batch (8320 tokens); the kernel itself is
            # chosen on the product alone (bitvit.nn.kernels.benchmark_kernels).
            acc = int_matmul(q2, codes.t(), kernel)
        else:  # the codes stay float: no casts to int8 and back (the same values)
            q, s = absmax_codes(x)
            codes = codes.float()
            acc = fp32_mm(q.reshape(-1, q.shape[-1]), codes.t())
        y = rescale(acc, s.reshape(-1, 1), scale, bias)
        ctx.save_for_backward(q, s, codes, scale)
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)  # not -1: 0 rows

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        q, s, codes, scale = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).float()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # A new tensor either way (codes may be the saved fp32 codes: never in place).
            w_q = codes.mul(scale.reshape(-1, 1)) if codes.is_floating_point() else (
                codes.float().mul_(scale.reshape(-1, 1)))
            grad_x = (g @ w_q).reshape(*q.shape[:-1], w_q.shape[-1])
        if ctx.needs_input_grad[1]:
            x_q = (q.div(s) if q.is_floating_point() else q.float().div_(s))
            x_q = x_q.reshape(-1, q.shape[-1])
            grad_w = g.t() @ x_q
        grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None


class BitLinear(nn.Linear):
    """A linear layer with low-bit weights (and optionally activations), trained through STEs.

    The latent ``weight`` stays full precision (it is what the optimizer updates and what the
    state dict holds, under the same keys as ``nn.Linear``); the forward pass uses
    ``quantize_weights(weight, method)``. The bias stays full precision.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        method: str = "b158",
        act_bits: int | str | None = "default",
        sub_norm: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.method = check_method(method)
        self.act_bits = resolve_act_bits(method, act_bits)
        # BitNet's SubLN: normalize before quantizing so the absmax scale sees unit-scale inputs.
        # No affine parameters, so the state dict keeps nn.Linear's keys.
        self.sub_norm = sub_norm

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, method: str, act_bits: int | str | None = "default",
        sub_norm: bool = False,
    ) -> BitLinear:
        """A BitLinear sharing ``linear``'s parameters, so optimizers and checkpoints carry over."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    method=method, act_bits=act_bits, sub_norm=sub_norm, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.train(linear.training)  # an eval-mode model stays in eval mode
        return layer

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_weights(self.weight, self.method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sub_norm:
            x = F.layer_norm(x, (self.in_features,), eps=EPS)
        codes, scale = self.quantized_weight()
        if self._int8_path_ok(x):
            return _Int8Linear.apply(x, self.weight, self.bias, codes, scale.reshape(-1),
                                     kernel_name(x.device.type))
        if self.act_bits == 8:
            x = ste_identity(x, quantize_activations(x, 8))
        elif self.act_bits == 1:
            x = ste_clipped(x, quantize_activations(x, 1))
        w = weight_ste(self.method)(self.weight, (codes * scale).to(self.weight.dtype))
        return F.linear(x, w, self.bias)

    def _int8_path_ok(self, x: torch.Tensor) -> bool:
        # Int8 activations times integer codes: exact in int32. Autocast (bf16) keeps the
        # plain path so the layer computes in the precision the user asked for.
        return (
            self.act_bits == 8
            and METHOD_TABLE[self.method].int_path
            and x.dtype == torch.float32
            and x.device.type in ("cpu", "cuda")
            and not torch.is_autocast_enabled(x.device.type)
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, method={self.method}, act_bits={self.act_bits}" + (
            ", sub_norm=True" if self.sub_norm else ""
        )


# ---------------------------------------------------------------------------------------------
# The transform.
# ---------------------------------------------------------------------------------------------


@dataclass
class QuantConfig:
    """The ``quant:`` section of a config: the arguments of `quantize_`."""

    method: str = FULL_PRECISION  # fp or a METHOD_TABLE name
    where: str = "all"  # all | mlp | attn | none
    # 8 | 1 | null. Given as default (the method table's default_act_bits; null for fp), none,
    # or the strings older config.yaml files hold: resolved here, once, so nothing downstream
    # sees them.
    act_bits: int | str | None = "default"
    include_patch_embed: bool = True  # with where=all, quantize the patch projection too
    sub_norm: bool = False  # BitNet's SubLN: LayerNorm (no affine) before activation quantization

    def __post_init__(self) -> None:
        if self.method != FULL_PRECISION:
            check_method(self.method)
            self.act_bits = resolve_act_bits(self.method, self.act_bits)
        elif self.act_bits != "default":
            self.act_bits = resolve_act_bits(self.method, self.act_bits)  # still checked
        else:
            self.act_bits = None  # full precision: no activation quantization
        if self.where not in WHERE:
            raise ValueError(f"quant.where={self.where!r}: expected one of {', '.join(WHERE)}")


@dataclass
class QuantizedLayer:
    """One row of `quantize_`'s summary."""

    name: str
    method: str
    shape: tuple[int, int]  # (out_features, in_features)
    bits_per_weight: float  # information bits: log2(3) for ternary, 1 for binary
    act_bits: int | None


# Module names of the blocks' parts and of the classifier: timm's and bitvit's (attn, mlp,
# head), and Hugging Face's (attention, self_attn, classifier).
ATTENTION_NAMES = frozenset({"attn", "attention", "self_attn"})
MLP_NAMES = frozenset({"mlp"})
HEAD_NAMES = frozenset({"head", "classifier"})


def _selected(name: str, where: str, include_patch_embed: bool) -> bool:
    parts = set(name.split("."))
    if where == "none":
        return False
    if where == "mlp":
        return bool(parts & MLP_NAMES)
    if where == "attn":
        return bool(parts & ATTENTION_NAMES)
    return include_patch_embed or "patch_embed" not in parts  # all


def _is_head(name: str) -> bool:
    return bool(set(name.split(".")) & HEAD_NAMES)  # also inside a wrapper (vit.head)


def quantize_(
    model: nn.Module,
    method: str,
    where: str = "all",
    act_bits: int | str | None = "default",
    include_patch_embed: bool = True,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    sub_norm: bool = False,
) -> list[QuantizedLayer]:
    """Swap the model's ``nn.Linear`` layers for `BitLinear` in place; return one row per layer.

    ``where``: ``all`` (every linear but the head; the patch embedding when
    ``include_patch_embed``), ``mlp`` (fc1, fc2), ``attn`` (qkv, proj) or ``none``.
    ``filter_fn(module, name)``, when given, must also accept a layer for it to be quantized.
    The classifier (a module named ``head`` or ``classifier``) always stays full precision;
    attention layers are those under a module named ``attn``, ``attention`` or ``self_attn``,
    MLPs under ``mlp``. Quantizing nothing is refused (`ValueError`). The patch
    embedding never takes 1-bit activations (its input is pixels): it gets 8 bits instead.
    ``method="fp"`` changes nothing. A linear reached by two names is one `BitLinear` under both.
    """
    if where not in WHERE:
        raise ValueError(f"unknown where {where!r}: expected one of {', '.join(WHERE)}")
    if method == FULL_PRECISION:
        return []
    check_method(method)
    bits = resolve_act_bits(method, act_bits)
    if any(isinstance(m, BitLinear) for m in model.modules()):
        raise ValueError("model is already quantized: quantize_ a full-precision model")
    if type(model) is nn.Linear:  # it has no parent to be swapped in
        raise ValueError("quantize_ swaps a model's nn.Linear children in place; for a lone "
                         "nn.Linear use BitLinear.from_linear(linear, method)")
    rows, swapped = [], {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if type(module) is not nn.Linear or _is_head(name):
            continue
        if not _selected(name, where, include_patch_embed):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        if id(module) not in swapped:
            layer_bits = 8 if bits == 1 and "patch_embed" in name.split(".") else bits
            swapped[id(module)] = BitLinear.from_linear(module, method, layer_bits, sub_norm)
            rows.append(QuantizedLayer(name, method, (module.out_features, module.in_features),
                                       METHOD_TABLE[method].info_bits, layer_bits))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, swapped[id(module)])
    if not rows and where != "none":  # never what was asked: say so rather than train fp
        raise ValueError(
            f"quantize_ found no nn.Linear to quantize with where={where!r}"
            + (" and this filter_fn" if filter_fn is not None else "") + ": attention layers "
            f"are found by a module named {'/'.join(sorted(ATTENTION_NAMES))}, MLPs by "
            f"{'/'.join(sorted(MLP_NAMES))}, the classifier (kept) by "
            f"{'/'.join(sorted(HEAD_NAMES))}; pass filter_fn to choose layers by other names")
    return rows
