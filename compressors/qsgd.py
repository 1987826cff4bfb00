"""``qsgd`` (Alistarh et al. 2017): stochastic, unbiased quantization to s levels.

Per bucket of ``bucket_size`` elements: norm = ||x||_2 (fp32); each element becomes
sign(x) * l with l in {0..s} rounded stochastically from s |x| / norm, so E[decode] = x.
Fields: ``norms`` (fp32, one per bucket) and ``levels``: (signed level + s) in
ceil(log2(2s + 1)) bits per element, packed (no entropy code: fixed width, exact size).
s <= 127 keeps a level within 8 bits; finer quantization would cost more than fp16.
"""

from __future__ import annotations

import math

import torch

from compressors.base import Compressor, Fields, expect
from compressors.bits import pack_uint, unpack_uint
from compressors.registry import register
from fedbat.errors import PacketError, check_range


@register("qsgd")
class QSGD(Compressor):
    """QSGD: s-level stochastic quantization scaled by the L2 norm per bucket."""

    def __init__(
        self, levels: int = 7, bucket_size: int = 128, error_feedback: bool = False
    ) -> None:
        super().__init__(error_feedback)
        check_range("levels", levels, 1, 127, integer=True)  # <= 8 bits per level
        check_range("bucket_size", bucket_size, 1, 2**31 - 1, integer=True)
        self.levels, self.bucket_size = int(levels), int(bucket_size)
        self.width = math.ceil(math.log2(2 * self.levels + 1))

    def _buckets(self, numel: int) -> int:
        return math.ceil(numel / self.bucket_size)

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Fields:
        flat = x.detach().reshape(-1).to(torch.float32)
        n, s = flat.numel(), self.levels
        padded = torch.nn.functional.pad(flat, (0, self._buckets(n) * self.bucket_size - n))
        buckets = padded.view(-1, self.bucket_size)
        norms = buckets.norm(dim=1, keepdim=True)
        scaled = torch.where(norms > 0, buckets.abs() / norms * s, torch.zeros_like(buckets))
        low = scaled.floor()
        up = torch.rand(scaled.shape, generator=generator) < (scaled - low)
        signed = torch.sign(buckets) * (low + up.float())
        q = (signed.reshape(-1)[:n] + s).to(torch.int64)
        return {"norms": norms.reshape(-1), "levels": pack_uint(q, self.width)}

    def decode(self, fields: Fields, shape: torch.Size) -> torch.Tensor:
        n, s = math.prod(shape), self.levels
        nb = self._buckets(n)
        norms = expect(fields, "norms", torch.float32, nb)
        packed = expect(fields, "levels", torch.uint8, (n * self.width + 7) // 8)
        if bool((norms < 0).any()):
            raise PacketError("field 'norms': negative norm")
        q = unpack_uint(packed, self.width, n)
        if bool((q > 2 * s).any()):
            raise PacketError(f"field 'levels': level above {2 * s}")
        per_elem = norms.repeat_interleave(self.bucket_size)[:n]
        return (per_elem * (q.to(torch.float32) - s) / s).reshape(shape)
