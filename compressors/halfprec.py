"""``fp16`` / ``bf16``: each element sent in 16 bits, rounded to nearest (what NVFlare's
message quantization calls half precision).

fp16 keeps 11 significant bits (relative error at most 2^-11 for |x| in its normal range,
6.1e-5 to 65504) but saturates: an element beyond +-65504 is sent as +-65504 (error
feedback, when on, carries the rest). bf16 keeps fp32's range with 8 significant bits
(relative error at most 2^-8). Both are biased (deterministic rounding) and lossless for
tensors already in their dtype.

>>> c = FP16()
>>> c.decode(c.encode(torch.tensor([1.0, 1e6]), torch.Generator()), torch.Size([2]))
tensor([1.0000e+00, 6.5504e+04])
"""

from __future__ import annotations

import math

import torch

from fedbat.compressors.base import Compressor, Fields, expect
from fedbat.compressors.registry import register


class HalfPrecision(Compressor):
    """Every element as a 16-bit float of ``dtype``."""

    dtype: torch.dtype

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Fields:
        top = torch.finfo(self.dtype).max
        flat = x.detach().reshape(-1).to(torch.float32).clamp(-top, top)
        return {"values": flat.to(self.dtype).cpu()}

    def decode(self, fields: Fields, shape: torch.Size) -> torch.Tensor:
        values = expect(fields, "values", self.dtype, math.prod(shape))
        return values.to(torch.float32).reshape(shape)

    def max_payload_bytes(self, shape: tuple[int, ...]) -> int:
        numel = math.prod(shape)
        return 2 * numel


@register("fp16")
class FP16(HalfPrecision):
    """Every element as an IEEE fp16 (saturating at +-65504)."""

    dtype = torch.float16


@register("bf16")
class BF16(HalfPrecision):
    """Every element as a bfloat16."""

    dtype = torch.bfloat16
