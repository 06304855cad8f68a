"""How much memory a model takes, from its config alone: nothing is built or allocated.

`bitvit.deploy.profile` counts a built model's parameters layer by layer; training needs the
answer before it builds anything (a config asking for a billion-wide model must be refused, not
allocated), and may not import deploy. So the count is done here in closed form, and tested
against a built model's ``numel``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from bitvit.nn.model import ViTConfig

FLOAT_BYTES = 4  # fp32 weights, gradients, optimizer moments and activations
# Per parameter while training with Adam/AdamW: the weight, its gradient and two moments.
TRAIN_STATE_BYTES = 4 * FLOAT_BYTES
# A quantized linear's forward builds its codes and the dequantized weight (both weight-sized)
# and keeps them for the backward pass.
QUANT_EXTRA_BYTES = 2 * FLOAT_BYTES


@dataclass(frozen=True)
class Footprint:
    """An estimate of a model's memory, in bytes: a lower bound of what it takes, close enough
    to refuse what cannot fit (activations are counted as autograd keeps them, roughly)."""

    parameters: int
    state_bytes: int  # weights (inference) or weights, gradients and optimizer (training)
    activation_bytes: int

    @property
    def total(self) -> int:
        return self.state_bytes + self.activation_bytes


def _tokens(m: ViTConfig) -> int:
    return (m.image_size // m.patch_size) ** 2 + (m.pooling == "cls")


def _hidden(m: ViTConfig) -> int:
    """The MLP's width, ``int(dim * mlp_ratio)`` as `bitvit.nn.model.Block` computes it."""
    try:
        return int(m.dim * m.mlp_ratio)
    except OverflowError:  # a dim or ratio beyond a float (10**400): in exact arithmetic, so
        # that the estimate refuses the model rather than crash on it
        return int(m.dim * Fraction(m.mlp_ratio))


def linear_parameters(m: ViTConfig) -> dict[str, int]:
    """Parameters of the linears quantization may replace, by kind: patch, attn, mlp."""
    d, hidden = m.dim, _hidden(m)
    patch_in = m.in_channels * m.patch_size ** 2
    return {"patch": patch_in * d + d,
            "attn": m.depth * (d * 3 * d + (3 * d if m.qkv_bias else 0) + d * d + d),
            "mlp": m.depth * (d * hidden + hidden + hidden * d + d)}


def parameter_count(m: ViTConfig) -> int:
    """The number of parameters of `VisionTransformer(m)` (quantization adds none)."""
    d = m.dim
    # Two LayerNorms per block and the final one (none with final_norm "none").
    norms = m.depth * 4 * d + (2 * d if m.final_norm != "none" else 0)
    embeddings = _tokens(m) * d + (d if m.pooling == "cls" else 0)
    head = d * m.num_classes + m.num_classes
    return sum(linear_parameters(m).values()) + norms + embeddings + head


def _quantized_parameters(m: ViTConfig, method: str, where: str,
                          include_patch_embed: bool) -> int:
    if method == "fp" or where == "none":
        return 0
    linears = linear_parameters(m)
    kinds = {"all": ("attn", "mlp"), "attn": ("attn",), "mlp": ("mlp",)}.get(where, ())
    patch = linears["patch"] if include_patch_embed and where == "all" else 0
    return sum(linears[k] for k in kinds) + patch


def activation_floats(m: ViTConfig, training: bool) -> int:
    """Floats of activations per image: what autograd keeps for the backward pass when
    ``training``, else the largest a forward pass holds at once."""
    d, hidden, tokens = m.dim, _hidden(m), _tokens(m)
    attention = m.heads * tokens  # one row of attention weights per token and head
    if not training:
        return tokens * (4 * d + hidden + attention)
    # Per token and block: the norms' and linears' inputs, q/k/v, the attention output and
    # weights, the MLP's hidden layer before and after GELU. Measured with autograd's saved-
    # tensor hooks: 8d + 2h + heads x tokens is within 10% for fp (int8 paths keep less).
    per_block = 8 * d + 2 * hidden + attention
    return tokens * (m.depth * per_block + 2 * d) + m.in_channels * m.image_size ** 2


def estimate(m: ViTConfig, batch_size: int, training: bool, method: str = "fp",
             where: str = "none", include_patch_embed: bool = True) -> Footprint:
    """The memory of the model ``m`` describes, for a batch of ``batch_size`` images, training
    (with Adam) or not; a quantized model (``method``, ``where``) adds its weight copies."""
    params = parameter_count(m)
    state = params * (TRAIN_STATE_BYTES if training else FLOAT_BYTES)
    if training:
        state += _quantized_parameters(m, method, where, include_patch_embed) * QUANT_EXTRA_BYTES
    return Footprint(params, state, batch_size * activation_floats(m, training) * FLOAT_BYTES)
