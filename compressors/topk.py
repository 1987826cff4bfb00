"""``topk``: keep the k = ceil(ratio * numel) largest-magnitude entries.

Fields: ``values`` (fp32, in increasing index order) and either ``indices`` (int32) or
``bitmap`` (1 bit per element), whichever is smaller.
"""

from __future__ import annotations

import math

import torch

from fedbat.compressors.base import Compressor, Fields, expect
from fedbat.compressors.bits import pack_bits, unpack_bits
from fedbat.compressors.registry import register
from fedbat.errors import PacketError, check_range


@register("topk")
class TopK(Compressor):
    """Top-k sparsification: the largest |x| entries, as int32 indices or a bitmap."""

    def __init__(self, ratio: float = 0.01, error_feedback: bool = False) -> None:
        super().__init__(error_feedback)
        check_range("ratio", ratio, 0.0, 1.0, low_open=True)
        self.ratio = float(ratio)

    def k(self, numel: int) -> int:
        return max(1, math.ceil(self.ratio * numel))

    def max_payload_bytes(self, shape: tuple[int, ...]) -> int:
        numel = math.prod(shape)
        k = self.k(numel)
        return 8 * k if 32 * k < numel else (numel + 7) // 8 + 4 * k

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Fields:
        flat = x.detach().reshape(-1).to(torch.float32)
        k = self.k(flat.numel())
        idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
        values = flat[idx].contiguous()
        if 32 * k < flat.numel():
            return {"indices": idx.to(torch.int32), "values": values}
        mask = torch.zeros(flat.numel(), dtype=torch.bool)
        mask[idx] = True
        return {"bitmap": pack_bits(mask), "values": values}

    def decode(self, fields: Fields, shape: torch.Size) -> torch.Tensor:
        n = math.prod(shape)
        k = self.k(n)
        values = expect(fields, "values", torch.float32, k)
        if 32 * k < n:
            idx = expect(fields, "indices", torch.int32, k).to(torch.int64)
            if k and (idx.min() < 0 or idx.max() >= n or bool((idx.diff() <= 0).any())):
                raise PacketError("field 'indices': out of range or not strictly increasing")
        else:
            mask = unpack_bits(expect(fields, "bitmap", torch.uint8, (n + 7) // 8), n)
            idx = mask.nonzero().reshape(-1)
            if idx.numel() != k:
                raise PacketError(f"field 'bitmap': {idx.numel()} bits set, expected {k}")
        out = torch.zeros(n, dtype=torch.float32)
        out[idx] = values
        return out.reshape(shape)
