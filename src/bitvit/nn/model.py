"""A Vision Transformer in small modules, so quantized linears drop in (see `bitvit.quantize_`).

Module names are stable and are what quantization, checkpoints and exports refer to:
``patch_embed.proj``, ``blocks.N.attn.qkv``, ``blocks.N.attn.proj``, ``blocks.N.mlp.fc1``,
``blocks.N.mlp.fc2``, ``head``.

Beyond the first study's ViT, the config expresses what pretrained ViTs differ in
(`bitvit.nn.pretrained` reads Hugging Face and timm weights): the LayerNorm epsilon, where the
final norm goes, whether q, k and v have a bias, and the GELU form. Their defaults are the
first study's model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ViTConfig:
    """The ``model:`` section of a config."""

    image_size: int = 32
    in_channels: int = 3
    patch_size: int = 16
    dim: int = 256
    depth: int = 6
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0  # after the patch embedding, attention projection and MLP layers
    attn_dropout: float = 0.0  # on the attention weights
    drop_path: float = 0.0  # stochastic depth, rising linearly to this rate in the last block
    num_classes: int = 10
    pooling: str = "cls"  # cls | mean
    # What pretrained ViTs differ in (Hugging Face: eps 1e-12; timm: 1e-6, norm after pooling
    # with global average pooling, no qkv bias in some; Hugging Face gelu_new: the tanh form).
    norm_eps: float = 1e-5  # every LayerNorm's epsilon (torch's default)
    final_norm: str = "tokens"  # tokens (every token, before pooling) | pooled (after) | none
    qkv_bias: bool = True
    gelu: str = "exact"  # exact (erf) | tanh (the tanh approximation)

    # Keys written to configs only when they differ from their defaults, so that the configs of
    # models without them (config.yaml, checkpoints, exports) read exactly as before: sweeps
    # compare config.yaml files as written.
    WRITTEN_IF_SET = ("norm_eps", "final_norm", "qkv_bias", "gelu")
    CHOICES = {"pooling": ("cls", "mean"), "final_norm": ("tokens", "pooled", "none"),
               "gelu": ("exact", "tanh")}

    def __post_init__(self) -> None:
        for key in ("image_size", "in_channels", "patch_size", "dim", "heads", "num_classes"):
            if getattr(self, key) < 1:  # before the divisions below
                raise ValueError(f"model.{key}={getattr(self, key)}: expected a positive integer")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"model.patch_size={self.patch_size} must divide model.image_size={self.image_size}"
            )
        if self.dim % self.heads:
            raise ValueError(f"model.heads={self.heads} must divide model.dim={self.dim}")
        for key, valid in self.CHOICES.items():
            if getattr(self, key) not in valid:
                raise ValueError(f"model.{key}={getattr(self, key)!r}: expected one of "
                                 f"{', '.join(valid)}")


class PatchEmbed(nn.Module):
    """Flattened non-overlapping patches through one fully connected layer (first study)."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int,
                 linear_layer: Callable[..., nn.Module] = nn.Linear) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = linear_layer(in_channels * patch_size * patch_size, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        # (B, C, H, W) -> (B, H/p * W/p, C * p * p), patches in row-major order.
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return self.proj(x.reshape(b, (h // p) * (w // p), c * p * p))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_dropout: float = 0.0, dropout: float = 0.0,
                 linear_layer: Callable[..., nn.Module] = nn.Linear, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.qkv = linear_layer(dim, 3 * dim, bias=qkv_bias)
        self.proj = linear_layer(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.attn_dropout if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, d)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0,
                 linear_layer: Callable[..., nn.Module] = nn.Linear, gelu: str = "exact") -> None:
        super().__init__()
        self.fc1 = linear_layer(dim, hidden)
        self.act = nn.GELU(approximate="tanh" if gelu == "tanh" else "none")
        self.fc2 = linear_layer(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer encoder block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 attn_dropout: float = 0.0, drop_path: float = 0.0,
                 linear_layer: Callable[..., nn.Module] = nn.Linear,
                 norm_eps: float = 1e-5, qkv_bias: bool = True, gelu: str = "exact") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, heads, attn_dropout, dropout, linear_layer, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout, linear_layer, gelu)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig | None = None,
                 linear_layer: Callable[..., nn.Module] = nn.Linear) -> None:
        super().__init__()
        c = self.config = config or ViTConfig()
        self.patch_embed = PatchEmbed(c.image_size, c.patch_size, c.in_channels, c.dim,
                                      linear_layer)
        num_tokens = self.patch_embed.num_patches + (c.pooling == "cls")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim)) if c.pooling == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, c.dim))
        self.pos_drop = nn.Dropout(c.dropout)
        rates = [c.drop_path * i / max(c.depth - 1, 1) for i in range(c.depth)]
        self.blocks = nn.ModuleList(
            Block(c.dim, c.heads, c.mlp_ratio, c.dropout, c.attn_dropout, r, linear_layer,
                  c.norm_eps, c.qkv_bias, c.gelu)
            for r in rates
        )
        # Applied to every token before pooling, to the pooled vector, or not at all.
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps) if c.final_norm != "none" else None
        # The classifier stays nn.Linear: quantize_ never touches it.
        self.head = nn.Linear(c.dim, c.num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        # timm's ViT initialisation: truncated normal (std 0.02) linears, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups: weight decay on the matrices only. Norms, biases, the position
        embedding and the cls token are not weights that over-fit by growing."""
        no_decay_names = {"pos_embed", "cls_token"}
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            (no_decay if p.ndim <= 1 or name in no_decay_names else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) if self.config.final_norm == "tokens" else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        if self.config.final_norm == "pooled":
            x = self.norm(x)
        return self.head(x)
