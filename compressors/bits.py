"""Bit packing shared by every compressor: the only place bits become bytes.

Layout: bits are packed most-significant-bit first (``numpy.packbits`` order), the last
byte zero-padded. A b-bit unsigned integer is written as its b bits, most significant first,
one integer after another.
"""

from __future__ import annotations

import numpy as np
import torch

from fedbat.errors import PacketError


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Booleans -> uint8 bytes, 8 per byte, MSB first.

    >>> pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool))
    tensor([129, 128], dtype=torch.uint8)
    """
    flat = bits.detach().reshape(-1).to(torch.bool).cpu().numpy()
    return torch.from_numpy(np.packbits(flat))


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """uint8 bytes -> ``count`` booleans (inverse of :func:`pack_bits`)."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (count + 7) // 8:
        raise PacketError(
            f"packed bits: expected {(count + 7) // 8} uint8 bytes, got {tuple(packed.shape)} "
            f"{packed.dtype}"
        )
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count).astype(bool))


MAX_WIDTH = 8  # a group of 8 integers of <= 8 bits is one int64 word: packing is vectorised


def pack_uint(values: torch.Tensor, width: int) -> torch.Tensor:
    """Unsigned integers < 2**width (width <= 8) -> ``width`` bits each, packed.

    Every 8 integers are exactly ``width`` bytes: each group is built as one int64 word and
    cut into bytes, so the cost is a few vector ops however narrow the integers are.

    >>> pack_uint(torch.tensor([3, 0, 1, 2]), 2)
    tensor([198], dtype=torch.uint8)
    """
    _check_width(width)
    v = values.reshape(-1).to(torch.int64).cpu()
    n = v.numel()
    groups = torch.nn.functional.pad(v, (0, -n % 8)).view(-1, 8)
    words = (groups << torch.arange(7 * width, -1, -width)).sum(1)
    out = (words[:, None] >> torch.arange(8 * (width - 1), -1, -8)) & 0xFF
    return out.to(torch.uint8).reshape(-1)[: (n * width + 7) // 8]


def unpack_uint(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_uint` for ``count`` integers (int64)."""
    _check_width(width)
    size = (count * width + 7) // 8
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != size:
        raise PacketError(
            f"packed integers: expected {size} uint8 bytes, got {tuple(packed.shape)} "
            f"{packed.dtype}"
        )
    b = torch.nn.functional.pad(packed.to(torch.int64), (0, -packed.numel() % width))
    words = (b.view(-1, width) << torch.arange(8 * (width - 1), -1, -8)).sum(1)
    v = (words[:, None] >> torch.arange(7 * width, -1, -width)) & ((1 << width) - 1)
    return v.reshape(-1)[:count]


def _check_width(width: int) -> None:
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"integer width {width}: must be in [1, {MAX_WIDTH}]")


def encode_scaled_signs(bits: torch.Tensor, scale: torch.Tensor | float) -> dict[str, torch.Tensor]:
    """The 1-bit wire format: a bit per element (1 -> +scale, 0 -> -scale), one fp32 scale."""
    return {
        "signs": pack_bits(bits),
        "scale": torch.as_tensor(scale, dtype=torch.float32).reshape(1).cpu(),
    }


def scaled_signs_bytes(numel: int) -> int:
    """Payload bytes of :func:`encode_scaled_signs` for ``numel`` elements."""
    return (numel + 7) // 8 + 4


def decode_scaled_signs(fields: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`encode_scaled_signs`, validating the fields."""
    from fedbat.compressors.base import expect

    n = int(np.prod(shape))
    signs = expect(fields, "signs", torch.uint8, (n + 7) // 8)
    scale = expect(fields, "scale", torch.float32, 1)
    if scale.item() < 0:
        raise PacketError(f"scale: must be >= 0, got {scale.item()}")
    b = unpack_bits(signs, n).to(torch.float32)
    return (scale * (2 * b - 1)).reshape(shape)
