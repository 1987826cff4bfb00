"""``none``: the identity, i.e. plain FedAvg; the reference for every other compressor. A
tensor travels in its own floating dtype (fp32; fp16 or bf16 for a half-precision model)."""

from __future__ import annotations

import math

import torch

from fedbat.compressors.base import Compressor, Fields, expect
from fedbat.compressors.registry import register


@register("none")
class NoCompression(Compressor):
    """The identity (FedAvg): 32 bits per element, 16 for a half-precision tensor.

    >>> c = NoCompression()
    >>> c.encode(torch.ones(3, dtype=torch.bfloat16), torch.Generator())["values"].dtype
    torch.bfloat16
    """

    lossless = True

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Fields:
        dtype = x.dtype if x.dtype in FLOATS else torch.float32
        return {"values": x.detach().reshape(-1).to(dtype).cpu()}

    def decode(self, fields: Fields, shape: torch.Size) -> torch.Tensor:
        got = fields.get("values")
        dtype = got.dtype if got is not None and got.dtype in FLOATS else torch.float32
        return expect(fields, "values", dtype, math.prod(shape)).reshape(shape)


FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # the dtypes a tensor travels in
