"""Packing ternary and binary codes into bytes, and back: pure, vectorized functions on torch
tensors (any device). ``base3`` holds 5 ternary codes a byte, ``2bit`` 4, ``1bit`` 8 binary codes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _digits(codes: torch.Tensor, allowed: str, per_byte: int) -> torch.Tensor:
    """Flattened codes as non-negative integers, padded to whole groups of ``per_byte``."""
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    flat = codes.reshape(-1)
    # Checked before the cast to int16, which would wrap 65537 to 1.
    if allowed == "ternary":
        if flat.numel() and ((flat < -1) | (flat > 1)).any():
            raise ValueError("ternary codes must be in {-1, 0, 1}")
        digits = flat.to(torch.int16) + 1  # 0, 1, 2
    else:
        if flat.numel() and ((flat != 1) & (flat != -1)).any():
            raise ValueError("binary codes must be in {-1, 1}")
        digits = (flat > 0).to(torch.int16)  # 0, 1
    pad = -flat.numel() % per_byte
    digits = torch.cat([digits, digits.new_zeros(pad)])
    return digits.reshape(-1, per_byte)


def _unpacked(packed: torch.Tensor, shape: Sequence[int], per_byte: int) -> tuple[torch.Tensor,
                                                                                  int]:
    """Check ``packed`` holds exactly the bytes for ``shape``; return it as int16 and the count."""
    n = math.prod(shape)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    expected = packed_numel(n, per_byte)
    if packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(f"packed codes for shape {tuple(shape)} must be {expected} bytes "
                         f"(1-d), got shape {tuple(packed.shape)}")
    return packed.to(torch.int16), n


def packed_numel(count: int, per_byte: int) -> int:
    """Bytes needed for ``count`` codes at ``per_byte`` codes per byte."""
    return -(-count // per_byte)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Ternary codes {-1, 0, 1} (any shape) -> uint8, 5 per byte in base 3 (1.6 bits each)."""
    digits = _digits(codes, "ternary", 5)
    powers = 3 ** torch.arange(5, dtype=torch.int16, device=codes.device)
    return (digits * powers).sum(dim=1).to(torch.uint8)


def unpack_ternary(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of `pack_ternary`: int8 codes of ``shape``."""
    p, n = _unpacked(packed, shape, 5)
    if p.numel() and p.max() > 242:  # 3^5 - 1: anything above is not a base-3 byte
        raise ValueError("base-3 packed codes have a byte above 242")
    powers = 3 ** torch.arange(5, dtype=torch.int16, device=packed.device)
    digits = (p[:, None] // powers) % 3
    return (digits.reshape(-1)[:n] - 1).to(torch.int8).reshape(tuple(shape))


def pack_ternary_2bit(codes: torch.Tensor) -> torch.Tensor:
    """Ternary codes {-1, 0, 1} -> uint8, 4 per byte in 2-bit fields (code + 1)."""
    digits = _digits(codes, "ternary", 4)
    shifts = torch.arange(0, 8, 2, dtype=torch.int16, device=codes.device)
    return (digits << shifts).sum(dim=1).to(torch.uint8)


def unpack_ternary_2bit(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of `pack_ternary_2bit`: int8 codes of ``shape``."""
    p, n = _unpacked(packed, shape, 4)
    shifts = torch.arange(0, 8, 2, dtype=torch.int16, device=packed.device)
    fields = (p[:, None] >> shifts) & 3
    codes = fields.reshape(-1)[:n]
    if codes.numel() and (codes == 3).any():
        raise ValueError("2-bit packed codes have a field 3 (only 0, 1, 2 encode -1, 0, 1)")
    return (codes - 1).to(torch.int8).reshape(tuple(shape))


def pack_binary(codes: torch.Tensor) -> torch.Tensor:
    """Binary codes {-1, 1} -> uint8, 8 per byte (bit k of byte i is code 8i+k == +1)."""
    bits = _digits(codes, "binary", 8)
    shifts = torch.arange(8, dtype=torch.int16, device=codes.device)
    return (bits << shifts).sum(dim=1).to(torch.uint8)


def unpack_binary(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of `pack_binary`: int8 codes in {-1, 1} of ``shape``."""
    p, n = _unpacked(packed, shape, 8)
    shifts = torch.arange(8, dtype=torch.int16, device=packed.device)
    bits = ((p[:, None] >> shifts) & 1).reshape(-1)[:n]
    return (bits * 2 - 1).to(torch.int8).reshape(tuple(shape))


PACK = {"base3": pack_ternary, "2bit": pack_ternary_2bit, "1bit": pack_binary}
UNPACK = {"base3": unpack_ternary, "2bit": unpack_ternary_2bit, "1bit": unpack_binary}
