"""The integer inference path: frozen quantized linears that multiply int8 by int8.

`convert_for_inference(model)` swaps every `BitLinear` of a trained model for an
`InferenceLinear` that holds only the int8 weight codes, the fp32 scale and the bias. Two engines:

- ``"int"``: activations are quantized per token to int8 (8-bit layers) or to their sign (1-bit
  layers), multiplied exactly by the weight codes, then rescaled once in fp32 and the bias
  added. The integer products are exact. For 8-bit layers of the methods `BitLinear` trains on
  its int8 path (b158, b158c, twn, bitnet) this is training's own arithmetic, bit for bit per
  layer; elsewhere it is the fake-quantized layer's function up to fp32 rounding order. With
  1-bit activations that rounding can matter: where a +-1 x code dot product is exactly 0 the
  int engine gives 0, fake quant a residue of either sign, and the next 1-bit layer's sign()
  makes that a full-size difference. Biases absorb such ties (after training they are nonzero);
  a layer without bias, or with zero biases as initialized, shows them.
- The integer product's kernel is chosen per machine (`bitvit.nn.kernels.choose_kernel`, once per
  process), the fastest in a cached micro-benchmark: ``int8`` (`torch._int_mm`, int32
  accumulation; VNNI/AMX CPUs, CUDA), ``u8s8`` (oneDNN's u8 x s8 product; AVX2 CPUs without
  VNNI) or ``fp32`` (the same integers through the fp32 matmul, exact: every partial sum is an
  integer below 2**24). All three give bit-identical outputs. ``$BITVIT_INT_KERNEL=int8|fp32|
  u8s8`` overrides the benchmark. The ``fp32`` kernel caches the codes as fp32 (4 more bytes per
  weight), ``u8s8`` prepacked (1 more byte per weight); `bitvit profile` counts them as resident.
- ``"fp"``: the fake-quant computation of `BitLinear`'s plain path (methods off its int8 path,
  1-bit activations, bf16 autocast), on a cached dequantized weight (``codes * scale``): the
  comparison baseline (and what runs under bf16 autocast).

Layers whose activations stay full precision (``act_bits=None``: the weights-only binary study)
use the dequantized weight under both engines: there is no integer product to take. The int
engine computes it per call, so that such a layer holds only its int8 codes (1 byte per weight,
what `bitvit profile` counts as resident).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitvit.nn.kernels import PackedCodes, choose_kernel, int_matmul, pack_codes
from bitvit.nn.model import Block, VisionTransformer
from bitvit.nn.quant import (
    EPS,
    METHODS,
    BitLinear,
    absmax_codes,
    absmax_int8,
    quantize_activations,
    rescale,
)

ENGINES = ("int", "fp")


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")
    return engine


# ---------------------------------------------------------------------------------------------
# The layer.
# ---------------------------------------------------------------------------------------------


class InferenceLinear(nn.Module):
    """A frozen quantized linear for inference: int8 codes + fp32 scale (+ bias).

    ``codes`` (out, in) int8 in {-1, 0, 1}; ``scale`` float32, (1,) per tensor or (out,) per
    output channel; ``codes * scale[:, None]`` is the weight. All three are buffers, so
    ``.to(device)`` moves them and the state dict holds them under these names.

    The codes are held once, 1 byte per weight: on the integer path ``codes`` is the (out, in)
    transpose of a contiguous (in, out) tensor, the layout ``torch._int_mm`` reads (`codes_t`,
    a view). The ``"fp"`` engine also caches the dequantized fp32 weight; the ``"int"`` engine
    dequantizes per call where it needs a float weight (weights-only layers, autocast). Under
    the ``fp32`` integer kernel (``kernel``, `bitvit.nn.kernels.choose_kernel` for the codes'
    device, chosen again by ``.to(device)``) the int engine also caches ``codes_f32``, the
    (in, out) codes as fp32: 4 more bytes per weight; under ``u8s8`` ``packed``, the codes in
    oneDNN's layout (`bitvit.nn.kernels.pack_codes`; not a buffer: its opaque tensor has no
    storage), 1 more byte per weight, which a compiled graph's u8s8 op finds from the codes
    (`bitvit.nn.kernels.packed_for`): under `torch.compile` too no codes are converted per call.
    """

    def __init__(self, codes: Tensor, scale: Tensor, bias: Tensor | None, method: str,
                 act_bits: int | None, sub_norm: bool = False, engine: str = "int") -> None:
        super().__init__()
        if codes.dim() != 2:
            raise ValueError(f"codes must be 2-D (out, in), got shape {tuple(codes.shape)}")
        out_features, in_features = codes.shape
        scale = scale.detach().reshape(-1).float()
        if scale.numel() not in (1, out_features):
            raise ValueError(f"scale must have 1 or {out_features} (out) elements, "
                             f"got shape {tuple(scale.shape)}")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
        if act_bits not in (8, 1, None):
            raise ValueError(f"unknown act_bits {act_bits!r}: expected 8, 1 or None")
        self.in_features, self.out_features = in_features, out_features
        self.method, self.act_bits, self.sub_norm = method, act_bits, sub_norm
        self.register_buffer("codes", codes.detach().to(torch.int8).contiguous())
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        # Derived and not saved: the fp engine's dequantized weight.
        self.register_buffer("weight_fp", None, persistent=False)
        self.register_buffer("codes_f32", None, persistent=False)  # for the fp32 kernel
        self.packed: PackedCodes | None = None  # for the u8s8 kernel
        self.engine = ""
        self.kernel: str | None = None  # the integer kernel (bitvit.nn.kernels), when uses_int
        self.set_engine(engine)
        # Loading new codes or scale must refresh the layout and the derived buffer too.
        self.register_load_state_dict_post_hook(lambda module, _: module.set_engine(module.engine))

    @classmethod
    def from_bitlinear(cls, layer: BitLinear, engine: str = "int") -> InferenceLinear:
        codes, scale = layer.quantized_weight()
        return cls(codes, scale, layer.bias, layer.method, layer.act_bits, layer.sub_norm, engine)

    @property
    def uses_int(self) -> bool:
        """Whether the forward pass multiplies integers (int engine, quantized activations)."""
        return self.engine == "int" and self.act_bits is not None

    @property
    def codes_t(self) -> Tensor | None:
        """The (in, out) codes ``torch._int_mm`` takes, a view of ``codes``; None off that path."""
        return self.codes.t() if self.uses_int else None

    def set_engine(self, engine: str) -> None:
        self.engine = check_engine(engine)
        # One copy of the codes, in the layout its reader wants: (in, out) contiguous for the
        # integer kernel (exposed as its (out, in) transpose), row-major otherwise.
        # .contiguous() copies only when the layout changes.
        if self.uses_int:
            self.codes = self.codes.t().contiguous().t()
        else:
            self.codes = self.codes.contiguous()
        self.weight_fp = self.dequantized_weight() if engine == "fp" else None
        self.kernel = choose_kernel(self.codes.device).name if self.uses_int else None
        self.codes_f32 = self.codes.t().float() if self.kernel == "fp32" else None
        self.packed = pack_codes(self.codes.t()) if self.kernel == "u8s8" else None

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's signature
        # After .to(device) (or any conversion) the kernel is chosen for the new device and
        # the derived buffers rebuilt from the codes.
        super()._apply(fn, recurse)
        self.set_engine(self.engine)
        return self

    def dequantized_weight(self) -> Tensor:
        return self.codes.float() * self.scale.reshape(-1, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.sub_norm:
            x = F.layer_norm(x, (self.in_features,), eps=EPS)
        if not self.uses_int or torch.is_autocast_enabled(x.device.type):
            return self._forward_fp(x)
        return self._forward_int(x)

    def _forward_fp(self, x: Tensor) -> Tensor:
        # Exactly BitLinear's fake-quant forward: the same activation quantizer, the same weight.
        w = self.weight_fp if self.weight_fp is not None else self.dequantized_weight()
        x = quantize_activations(x, self.act_bits)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _forward_int(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        as_int8 = self.kernel != "fp32"  # the fp32 kernel takes the same codes as floats
        if self.act_bits == 8:
            q, row_scale = absmax_int8(x2) if as_int8 else absmax_codes(x2)
        else:  # 1-bit: sign(x) in {-1, 1} times codes is exact; the token's mean|x| rescales
            q = torch.where(x2 >= 0, 1, -1).to(torch.int8 if as_int8 else torch.float32)
            row_scale = 1.0 / x2.abs().mean(dim=-1, keepdim=True)
        # The codes as the kernel reads them: int8 contiguous (in, out) (see set_engine), the
        # fp32 kernel's cached float copy, or u8s8's prepacked one.
        codes = {"fp32": self.codes_f32, "u8s8": self.packed}.get(self.kernel, self.codes.t())
        acc = int_matmul(q, codes, self.kernel)
        y = rescale(acc, row_scale, self.scale, self.bias)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, method={self.method}, act_bits={self.act_bits}, "
                f"engine={self.engine}" + (f", kernel={self.kernel}" if self.kernel else "")
                + (", sub_norm=True" if self.sub_norm else ""))


# ---------------------------------------------------------------------------------------------
# Model transforms.
# ---------------------------------------------------------------------------------------------


def convert_for_inference(model: nn.Module, engine: str = "int") -> nn.Module:
    """Swap every `BitLinear` in ``model`` for an `InferenceLinear`, in place; return the model."""
    check_engine(engine)
    if isinstance(model, BitLinear):  # a bare layer cannot be swapped in place
        return InferenceLinear.from_bitlinear(model, engine)
    for name, module in list(model.named_modules()):
        if isinstance(module, BitLinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, InferenceLinear.from_bitlinear(module, engine))
    return model


def set_engine(model: nn.Module, engine: str) -> nn.Module:
    """Switch every `InferenceLinear` in ``model`` between ``"int"`` and ``"fp"``."""
    check_engine(engine)
    for module in model.modules():
        if isinstance(module, InferenceLinear):
            module.set_engine(engine)
    return model


class ClsTokenBlock(nn.Module):
    """A ViT's last block when it pools the cls token: only the cls token's output, (B, 1, C).

    Keys and values come from every token; the query, the attention output, the MLP and the
    residuals only from the cls token, which is all that the cls pooling reads: the same
    numbers as that row of the whole block (each token is quantized on its own), for about a
    quarter of the block's products. The ONNX graph's last block does the same
    (`bitvit.deploy.onnx_export`). It holds the block's own submodules under their names, so
    the state dict is the block's; `full_block` gives the whole block back.
    """

    def __init__(self, block: Block) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = block.norm1, block.attn, block.norm2
        self.mlp, self.drop_path = block.mlp, block.drop_path

    def forward(self, x: Tensor) -> Tensor:
        attn = self.attn
        b, n, d = x.shape
        # q, k, v for every token from one product (its per-token quantization is each row's
        # own, so the cls row of q is what a cls-only q would be).
        q, k, v = attn.qkv(self.norm1(x)).reshape(b, n, 3, attn.heads, d // attn.heads).permute(
            2, 0, 3, 1, 4)
        p = attn.attn_dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q[:, :, :1], k, v, dropout_p=p)  # (b, h, 1, hd)
        a = attn.proj_drop(attn.proj(a.transpose(1, 2).reshape(b, 1, d)))
        x = x[:, :1] + self.drop_path(a)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def full_block(self) -> Block:
        """The whole block (every token's output), sharing these submodules."""
        block = Block.__new__(Block)
        nn.Module.__init__(block)
        block.norm1, block.attn, block.norm2 = self.norm1, self.attn, self.norm2
        block.mlp, block.drop_path = self.mlp, self.drop_path
        return block


@contextmanager
def whole_last_block(model: nn.Module) -> Iterator[None]:
    """The whole block in place of a loaded export's cls-only last block (`ClsTokenBlock`, what
    inference runs) for the ``with``, then the cls-only one again: a profile counts the
    architecture's per-image cost, as for a config or a checkpoint."""
    blocks = getattr(model, "blocks", None)
    if not (isinstance(blocks, nn.ModuleList) and len(blocks)
            and isinstance(blocks[-1], ClsTokenBlock)):
        yield
        return
    cls_only = blocks[-1]
    blocks[-1] = cls_only.full_block()
    try:
        yield
    finally:
        blocks[-1] = cls_only


def cls_token_last_block(vit: VisionTransformer) -> VisionTransformer:
    """With cls pooling, ``vit``'s last block becomes a `ClsTokenBlock` (in place): the final
    LayerNorm and the pooling then see the cls token alone, which is all they read."""
    if vit.cls_token is not None and len(vit.blocks) and isinstance(vit.blocks[-1], Block):
        vit.blocks[-1] = ClsTokenBlock(vit.blocks[-1])
    return vit


# ---------------------------------------------------------------------------------------------
# Fusion and agreement.
# ---------------------------------------------------------------------------------------------


def compile_model(model: nn.Module, example: Tensor | None = None, **compile_kwargs: object,
                  ) -> nn.Module:
    """``torch.compile`` a converted model, falling back to the eager model if that fails.

    Inductor fuses what the eager path runs as separate passes: LayerNorm with the next layer's
    per-token absmax, scale, round and int8 cast; the int32 -> fp32 rescale with the bias and
    GELU. ``example`` (a batch) triggers compilation now, so a missing C++ compiler or an
    unsupported op shows up here, with a warning, rather than on the first real call.
    """
    import warnings

    try:
        compiled = torch.compile(model, **compile_kwargs)
        if example is not None:
            with torch.no_grad():
                compiled(example)
        return compiled
    except Exception as err:  # noqa: BLE001 - any compiler failure means: run eager
        warnings.warn(f"torch.compile failed ({type(err).__name__}: {err}); running eager",
                      stacklevel=2)
        return model


@torch.no_grad()
def agreement(model_a: nn.Module, model_b: nn.Module, images: Tensor,
              labels: Tensor | None = None, batch_size: int = 500) -> dict[str, float]:
    """How closely two models agree on ``images`` (already normalized, (N, C, H, W)).

    Returns ``argmax_agreement`` (fraction of equal predictions), ``max_abs_logit_diff``,
    ``mean_abs_logit_diff`` and, with ``labels``, ``accuracy_a``, ``accuracy_b`` and
    ``accuracy_diff`` (a - b). Typical use: the same converted model under ``engine="fp"`` (the
    fake-quant reference) and ``engine="int"``.
    """
    model_a.eval()
    model_b.eval()
    pred_a, pred_b, diffs = [], [], []
    max_diff = 0.0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        a, b = model_a(x).float(), model_b(x).float()
        d = (a - b).abs()
        max_diff = max(max_diff, d.max().item())
        diffs.append(d.mean(dim=1))
        pred_a.append(a.argmax(dim=1))
        pred_b.append(b.argmax(dim=1))
    pa, pb = torch.cat(pred_a), torch.cat(pred_b)
    out = {"n": float(len(pa)), "argmax_agreement": (pa == pb).float().mean().item(),
           "max_abs_logit_diff": max_diff, "mean_abs_logit_diff": torch.cat(diffs).mean().item()}
    if labels is not None:
        labels = labels.to(pa.device)
        out["accuracy_a"] = (pa == labels).float().mean().item()
        out["accuracy_b"] = (pb == labels).float().mean().item()
        out["accuracy_diff"] = out["accuracy_a"] - out["accuracy_b"]
    return out
