"""``signsgd`` / ``ef_signsgd``: scaled sign, 1 bit per element plus one fp32 scale.

scale = mean |x| per tensor (Karimireddy et al. 2019); ``ef_signsgd`` adds error feedback.
Zeros are sent as +scale.
"""

from __future__ import annotations

import math

import torch

from fedbat.compressors.base import Compressor, Fields
from fedbat.compressors.bits import decode_scaled_signs, encode_scaled_signs, scaled_signs_bytes
from fedbat.compressors.registry import register


@register("signsgd")
class SignSGD(Compressor):
    """Scaled sign: 1 bit per element + fp32 mean |x|."""

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Fields:
        return encode_scaled_signs(x >= 0, x.abs().mean())

    def decode(self, fields: Fields, shape: torch.Size) -> torch.Tensor:
        return decode_scaled_signs(fields, shape)

    def max_payload_bytes(self, shape: tuple[int, ...]) -> int:
        numel = math.prod(shape)
        return scaled_signs_bytes(numel)


register("ef_signsgd", SignSGD, description="Scaled sign with error feedback", error_feedback=True)
