"""The quantization methods as plain data, importable without torch.

Every weight method is one row of `METHOD_TABLE` (a `QuantMethod`): its codes, scale
granularity, quantizer and STE (by name: keys of `bitvit.nn.quant.QUANTIZERS` and
`bitvit.nn.quant.STES`, checked when quant.py imports), default activation bits, packing and
formula. The command line builds its ``--quant`` choices and the config checks its quant keys
from this table, so adding a method is adding a row here. The README's method table lists the
same rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FULL_PRECISION = "fp"  # quant.method for "no quantization": no row in the table
DEFAULT_METHOD = "b158"  # what `bitvit profile --quant` applies to a checkpoint when not told
WHERE_NAMES = ("all", "mlp", "attn", "none")
# --act-bits and quant.act_bits: what each spelling means (default: the method's own, resolved
# once the method is known, in QuantConfig).
ACT_BITS_NAMES: dict[str, int | str | None] = {"8": 8, "1": 1, "none": None, "default": "default"}
ACT_BITS = (8, 1, None)  # the activation bits a layer runs with (None: full precision)

# The values a method's codes take. "centred binary" codes are signs around the mean.
CODE_VALUES = {"ternary": (-1, 0, 1), "binary": (-1, 1), "centred binary": (-1, 1)}
# none: scale 1; tensor: one scale; channel: one scale per output channel. A quantizer is called
# with its row's granularity.
GRANULARITIES = ("none", "tensor", "channel")
# The granularities each quantizer of bitvit.nn.quant.QUANTIZERS computes (its keys are these,
# checked when quant.py imports). A row pairing a quantizer with another granularity is refused
# when the row is made, at import, rather than on its first quantization: TWN's threshold is a
# per-channel statistic, BitNet's centred sign subtracts the whole tensor's mean.
QUANTIZER_GRANULARITIES: dict[str, tuple[str, ...]] = {
    "absmean_ternary": GRANULARITIES,
    "twn_threshold": ("channel",),
    "centred_sign": ("tensor",),
    "sign": GRANULARITIES,
}
# How packed codes are stored (bitvit.deploy.export): codes per byte and the values a packing holds.
CODES_PER_BYTE = {"base3": 5, "2bit": 4, "1bit": 8}
PACKING_VALUES = {"base3": (-1, 0, 1), "2bit": (-1, 0, 1), "1bit": (-1, 1)}
# The weight's backward rules (keys of bitvit.nn.quant.STES): identity is BitNet's; clipped,
# 1{|W| <= 1}, BinaryConnect's / XNOR-Net's.
STE_NAMES = ("identity", "clipped")


@dataclass(frozen=True)
class QuantMethod:
    """One weight quantization method. Every field is required and checked on creation, so a
    half-described method is refused with a one-line error rather than mishandled downstream."""

    name: str
    label: str  # human name, e.g. "BitNet b1.58" (README, reports)
    formula: str  # codes and scale, as the README's method table gives them
    codes: str  # a key of CODE_VALUES
    granularity: str  # one of GRANULARITIES
    quantizer: str  # a key of bitvit.nn.quant.QUANTIZERS: (fp32 W, granularity) -> codes, scale
    ste: str  # one of STE_NAMES: the weight's backward rule
    default_act_bits: int | None  # what act_bits="default" means
    int_path: bool  # BitLinear trains through the int8 x int8 kernel with 8-bit activations
    packings: tuple[str, ...]  # keys of CODES_PER_BYTE this method's codes may be stored in

    def __post_init__(self) -> None:
        def bad(field: str, expected: str) -> ValueError:
            return ValueError(f"quantization method {self.name!r}: {field}="
                              f"{getattr(self, field)!r}, expected {expected}")

        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise bad("name", "an identifier")
        for field in ("label", "formula"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field):
                raise bad(field, "a non-empty string")
        if self.codes not in CODE_VALUES:
            raise bad("codes", f"one of {', '.join(CODE_VALUES)}")
        if self.granularity not in GRANULARITIES:
            raise bad("granularity", f"one of {', '.join(GRANULARITIES)}")
        # Whether the name is a quantizer is checked where the quantizers are (bitvit.nn.quant).
        if not isinstance(self.quantizer, str) or not self.quantizer.isidentifier():
            raise bad("quantizer", "the name of a quantizer in bitvit.nn.quant.QUANTIZERS")
        allowed = QUANTIZER_GRANULARITIES.get(self.quantizer, GRANULARITIES)
        if self.granularity not in allowed:
            raise bad("granularity", f"{' or '.join(allowed)}, the granularity quantizer "
                      f"{self.quantizer!r} computes")
        if self.ste not in STE_NAMES:
            raise bad("ste", f"one of {', '.join(STE_NAMES)}")
        if self.default_act_bits not in ACT_BITS or isinstance(self.default_act_bits, bool):
            raise bad("default_act_bits", "8, 1 or None")
        if not isinstance(self.int_path, bool) or (self.int_path and self.ste != "identity"):
            raise bad("int_path", "a bool, True only with the identity STE (the int8 "
                      "kernel's weight gradient)")
        fits = [p for p in CODES_PER_BYTE if set(CODE_VALUES[self.codes]) <= set(PACKING_VALUES[p])]
        if (not isinstance(self.packings, tuple) or not self.packings
                or any(p not in fits for p in self.packings)):
            raise bad("packings", f"a non-empty tuple of {', '.join(fits)}")

    @property
    def info_bits(self) -> float:
        """Information bits per weight: log2 of the number of code values."""
        return math.log2(len(CODE_VALUES[self.codes]))

    def scale_count(self, out_features: int) -> int:
        """How many fp32 scales a layer stores (a scale of 1 is stored too, as one number)."""
        return out_features if self.granularity == "channel" else 1

    def packing(self, ternary_packing: str) -> str:
        """The packing used when ternary codes are asked to be ``ternary_packing``."""
        return ternary_packing if ternary_packing in self.packings else self.packings[0]

    def stored_bits(self, ternary_packing: str) -> float:
        """Bits per weight in the packed file."""
        return 8.0 / CODES_PER_BYTE[self.packing(ternary_packing)]


_TERNARY = {"codes": "ternary", "packings": ("base3", "2bit")}
_BINARY = {"packings": ("1bit",)}
# BitNet's methods: identity STE, 8-bit activations, the int8 training kernel. The binarization
# study's: clipped STE (BinaryConnect / XNOR-Net), full-precision activations.
_BITNET_LIKE = {"ste": "identity", "default_act_bits": 8, "int_path": True}
_BINARIZATION = {"ste": "clipped", "default_act_bits": None, "int_path": False}
METHOD_TABLE: dict[str, QuantMethod] = {m.name: m for m in (
    QuantMethod("b158", "BitNet b1.58",
                "RoundClip(W / (gamma + 1e-5), -1, 1), gamma = mean|W| per tensor",
                granularity="tensor", quantizer="absmean_ternary", **_TERNARY, **_BITNET_LIKE),
    QuantMethod("b158c", "BitNet b1.58, per channel",
                "RoundClip(W[o, :] / (gamma_o + 1e-5), -1, 1), gamma_o = mean_i |W[o, i]|",
                granularity="channel", quantizer="absmean_ternary", **_TERNARY, **_BITNET_LIKE),
    QuantMethod("twn", "Ternary Weight Networks (Li et al., 2016)",
                "sign(W) 1{|W| > D_o}, D_o = 0.7 mean_i |W[o, i]|; "
                "scale_o = mean of |W[o, i]| > D_o (0 if none)",
                granularity="channel", quantizer="twn_threshold", **_TERNARY, **_BITNET_LIKE),
    QuantMethod("bitnet", "BitNet 1-bit", "sign(W - mean W), scale mean|W| per tensor",
                codes="centred binary", granularity="tensor", quantizer="centred_sign",
                **_BINARY, **_BITNET_LIKE),
    QuantMethod("sign", "plain binarization", "sign(W), scale 1",
                codes="binary", granularity="none", quantizer="sign", **_BINARY,
                **_BINARIZATION),
    QuantMethod("xnor", "XNOR-Net / BWN", "sign(W), scale_o = mean_i |W[o, i]|",
                codes="binary", granularity="channel", quantizer="sign", **_BINARY,
                **_BINARIZATION),
)}
