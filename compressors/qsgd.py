"""``qsgd`` (Alistarh et al. 2017): stochastic, unbiased quantization to s levels.

Per bucket of ``bucket_size`` elements: norm = ||x||_2 (fp32); each element becomes
sign(x) * l with l in {0..s} rounded stochastically from s |x| / norm, so E[decode] = x.
Fields: ``norms`` (fp32, one per bucket) and either ``levels``: (signed level + s) in
ceil(log2(2s + 1)) bits per element, packed (``coding: fixed``, exact size), or, with
``coding: deflate``, ``levels_deflate``: those bytes through zlib's deflate (an LZ77 +
Huffman entropy code; levels cluster near 0, so this nearly halves them), sent only when
shorter than the fixed form. s <= 127 keeps a level within 8 bits.
"""

from __future__ import annotations

import math
import zlib

import torch

from fedbat.compressors.base import Compressor, Fields, expect
from fedbat.compressors.bits import pack_uint, unpack_uint
from fedbat.compressors.registry import register
from fedbat.errors import ConfigError, PacketError, check_range

CODINGS = ("fixed", "deflate")


@register("qsgd")
class QSGD(Compressor):
    """QSGD: s-level stochastic quantization scaled by the L2 norm per bucket."""

    def __init__(
        self,
        levels: int = 7,
        bucket_size: int = 128,
        coding: str = "fixed",
        error_feedback: bool = False,
    ) -> None:
        super().__init__(error_feedback)
        check_range("levels", levels, 1, 127, integer=True)  # <= 8 bits per level
        check_range("bucket_size", bucket_size, 1, 2**31 - 1, integer=True)
        if coding not in CODINGS:
            raise ConfigError(f"coding={coding!r}: must be one of {list(CODINGS)}")
        self.levels, self.bucket_size, self.coding = int(levels), int(bucket_size), coding
        self.width = math.ceil(math.log2(2 * self.levels + 1))

    def _buckets(self, numel: int) -> int:
        return math.ceil(numel / self.bucket_size)

    def max_payload_bytes(self, shape: tuple[int, ...]) -> int:
        numel = math.prod(shape)
        return 4 * self._buckets(numel) + (numel * self.width + 7) // 8

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
        levels = pack_uint(q, self.width)
        if self.coding == "deflate":
            deflated = zlib.compress(levels.numpy().tobytes(), 6)
            if len(deflated) < levels.numel():
                levels_z = torch.frombuffer(bytearray(deflated), dtype=torch.uint8)
                return {"norms": norms.reshape(-1), "levels_deflate": levels_z}
        return {"norms": norms.reshape(-1), "levels": levels}

    def decode(self, fields: Fields, shape: torch.Size) -> torch.Tensor:
        n, s = math.prod(shape), self.levels
        nb = self._buckets(n)
        norms = expect(fields, "norms", torch.float32, nb)
        size = (n * self.width + 7) // 8
        if self.coding == "deflate" and "levels_deflate" in fields:
            packed = _inflate(fields["levels_deflate"], size)
        else:
            packed = expect(fields, "levels", torch.uint8, size)
        if bool((norms < 0).any()):
            raise PacketError("field 'norms': negative norm")
        q = unpack_uint(packed, self.width, n)
        if bool((q > 2 * s).any()):
            raise PacketError(f"field 'levels': level above {2 * s}")
        per_elem = norms.repeat_interleave(self.bucket_size)[:n]
        return (per_elem * (q.to(torch.float32) - s) / s).reshape(shape)


def _inflate(field: torch.Tensor, size: int) -> torch.Tensor:
    """Deflated bytes -> exactly ``size`` bytes; never inflates more (no zip bombs), and no
    byte may follow the end of the stream."""
    if field.dtype != torch.uint8 or field.dim() != 1 or not 0 < field.numel() < size:
        raise PacketError(
            f"field 'levels_deflate': {tuple(field.shape)} {field.dtype}, expected fewer "
            f"than {size} uint8 bytes"
        )
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(field.numpy().tobytes(), size)
    except zlib.error as e:
        raise PacketError(f"field 'levels_deflate': {e}") from e
    if len(out) != size or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise PacketError(f"field 'levels_deflate': does not inflate to exactly {size} bytes")
    return torch.frombuffer(bytearray(out), dtype=torch.uint8)
