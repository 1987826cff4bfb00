"""``terngrad`` (Wen et al., NeurIPS 2017): stochastic ternary updates, unbiased.

Per tensor, s = max |x| (fp32); each element becomes s * sign(x) with probability |x| / s,
else 0, so E[decode] = x and E||decode - x||^2 = s ||x||_1 - ||x||^2 (the paper's
variance, summed). Trits travel 5 to a byte (3^5 = 243 <= 256: log2(3) = 1.585 bits an
element, 1.6 on the wire; ``packing: trits``) or 2 bits each (``packing: 2bit``). The
paper's layer-wise scaling is this per-tensor s; its gradient clipping is left to
``strategy.wrap`` (``clip``) or error feedback.
"""

from __future__ import annotations

import math

import torch

from fedbat.compressors.base import Compressor, Fields, expect
from fedbat.compressors.bits import pack_uint, unpack_uint
from fedbat.compressors.registry import register
from fedbat.errors import ConfigError, PacketError

PACKINGS = ("trits", "2bit")
POWERS = 3 ** torch.arange(4, -1, -1)  # a byte holds 5 trits, the first the most significant


@register("terngrad")
class TernGrad(Compressor):
    """TernGrad: stochastic {-1, 0, +1} times max|x|, unbiased."""

    def __init__(self, packing: str = "trits", error_feedback: bool = False) -> None:
        super().__init__(error_feedback)
        if packing not in PACKINGS:
            raise ConfigError(f"packing={packing!r}: must be one of {list(PACKINGS)}")
        self.packing = packing

    def _code_bytes(self, numel: int) -> int:
        return math.ceil(numel / 5) if self.packing == "trits" else (2 * numel + 7) // 8

    def max_payload_bytes(self, shape: tuple[int, ...]) -> int:
        numel = math.prod(shape)
        return 4 + self._code_bytes(numel)

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Fields:
        flat = x.detach().reshape(-1).to(torch.float32).cpu()
        s = flat.abs().max() if flat.numel() else torch.zeros(())
        keep = torch.rand(flat.shape, generator=generator) * s < flat.abs()
        trits = torch.where(keep, torch.sign(flat), torch.zeros_like(flat)).to(torch.int64) + 1
        return {"scale": s.reshape(1), "trits": self._pack(trits)}

    def _pack(self, trits: torch.Tensor) -> torch.Tensor:
        if self.packing == "2bit":
            return pack_uint(trits, 2)
        groups = torch.nn.functional.pad(trits, (0, -trits.numel() % 5), value=0).view(-1, 5)
        return (groups * POWERS).sum(1).to(torch.uint8)

    def decode(self, fields: Fields, shape: torch.Size) -> torch.Tensor:
        n = math.prod(shape)
        s = expect(fields, "scale", torch.float32, 1)
        packed = expect(fields, "trits", torch.uint8, self._code_bytes(n))
        if s.item() < 0:
            raise PacketError(f"field 'scale': must be >= 0, got {s.item()}")
        if self.packing == "2bit":
            trits = unpack_uint(packed, 2, n)
        else:
            if bool((packed >= 243).any()):
                raise PacketError("field 'trits': a byte above 242 (5 trits hold at most 242)")
            trits = (packed.to(torch.int64)[:, None] // POWERS % 3).reshape(-1)[:n]
        if bool((trits > 2).any()):
            raise PacketError("field 'trits': a code above 2")
        return (s * (trits - 1).to(torch.float32)).reshape(shape)
