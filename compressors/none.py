"""``none``: fp32 identity, i.e. plain FedAvg; the reference for every other compressor."""

from __future__ import annotations

import math

import torch

from fedbat.compressors.base import Compressor, Fields, expect
from fedbat.compressors.registry import register


@register("none")
class NoCompression(Compressor):
    """fp32 identity (FedAvg): 32 bits per element."""

    lossless = True

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Fields:
        return {"values": x.detach().reshape(-1).to(torch.float32).cpu()}

    def decode(self, fields: Fields, shape: torch.Size) -> torch.Tensor:
        return expect(fields, "values", torch.float32, math.prod(shape)).reshape(shape)
