"""``int8`` and ``nf4``: blockwise absmax quantization (Dettmers et al.: 8-bit optimizers,
2022; QLoRA, 2023), in pure torch on CPU.

Each block of ``block`` elements is sent as one fp32 scale, its largest |x|, and a code per
element: x / scale (in [-1, 1]) rounded to the nearest value of a codebook. ``int8``'s
codebook is the 255 levels k/127 (k in -127..127): an element's error is at most
scale / 254. ``nf4``'s is the 16 NormalFloat values (the quantiles of a standard normal,
scaled to [-1, 1], with an exact zero), packed 4 bits an element: an element's error is at
most scale times half the widest gap between neighbouring codes. Both are deterministic and
biased; error feedback is available.
"""

from __future__ import annotations

import math

import torch

from fedbat.compressors.base import Compressor, Fields, expect
from fedbat.compressors.bits import pack_uint, unpack_uint
from fedbat.compressors.registry import register
from fedbat.errors import PacketError, check_range


def normal_float_codebook(bits: int = 4, offset: float = 0.9677083) -> torch.Tensor:
    """QLoRA's NormalFloat codebook: 2^(bits-1) positive and 2^(bits-1) - 1 negative
    quantiles of N(0, 1), spaced evenly in probability from 0.5 to ``offset``, and 0, all
    divided by the largest (QLoRA, section 3 and appendix E).

    >>> normal_float_codebook()[[0, 7, 15]].tolist()
    [-1.0, 0.0, 1.0]
    """
    half = 2 ** (bits - 1)
    ppf = torch.special.ndtri
    positive = ppf(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])
    negative = -ppf(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    return (values / values.max()).sort().values.to(torch.float32)


class Blockwise(Compressor):
    """Absmax scale per block, the nearest codebook value per element."""

    codebook: torch.Tensor  # ascending values in [-1, 1]
    width: int  # bits per code

    def __init__(self, block: int = 64, error_feedback: bool = False) -> None:
        super().__init__(error_feedback)
        check_range("block", block, 1, 2**31 - 1, integer=True)
        self.block = int(block)

    def _blocks(self, numel: int) -> int:
        return math.ceil(numel / self.block)

    def max_payload_bytes(self, shape: tuple[int, ...]) -> int:
        numel = math.prod(shape)
        return 4 * self._blocks(numel) + (numel * self.width + 7) // 8

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Fields:
        flat = x.detach().reshape(-1).to(torch.float32).cpu()
        n = flat.numel()
        blocks = torch.nn.functional.pad(flat, (0, self._blocks(n) * self.block - n))
        blocks = blocks.view(-1, self.block)
        scales = blocks.abs().amax(dim=1)
        unit = blocks / torch.where(scales > 0, scales, torch.ones_like(scales))[:, None]
        codes = self._nearest(unit.reshape(-1)[:n])
        return {"scales": scales, "codes": pack_uint(codes, self.width)}

    def _nearest(self, unit: torch.Tensor) -> torch.Tensor:
        """The index of the codebook value nearest to each element (ties: the lower)."""
        book = self.codebook
        mids = (book[1:] + book[:-1]) / 2
        return torch.bucketize(unit, mids, right=False)

    def decode(self, fields: Fields, shape: torch.Size) -> torch.Tensor:
        n = math.prod(shape)
        scales = expect(fields, "scales", torch.float32, self._blocks(n))
        packed = expect(fields, "codes", torch.uint8, (n * self.width + 7) // 8)
        if bool((scales < 0).any()):
            raise PacketError("field 'scales': a negative scale")
        codes = unpack_uint(packed, self.width, n)
        if bool((codes >= self.codebook.numel()).any()):
            raise PacketError(f"field 'codes': a code above {self.codebook.numel() - 1}")
        per_elem = scales.repeat_interleave(self.block)[:n]
        return (per_elem * self.codebook[codes]).reshape(shape)


@register("int8")
class Int8(Blockwise):
    """Blockwise absmax int8: one fp32 scale per block, 8 bits per element."""

    codebook = torch.arange(-127, 128, dtype=torch.float32) / 127
    width = 8


@register("nf4")
class NF4(Blockwise):
    """Blockwise 4-bit NormalFloat (QLoRA): one fp32 scale per block, 4 bits per element."""

    codebook = normal_float_codebook()
    width = 4
