"""``randk``: k = ceil(ratio * n) coordinates drawn uniformly without replacement from the
link's shared randomness (``SharedSeed``: the run seed, the round, the sender and the
tensor), so the indices cost no bits: both ends draw them. Only the k fp32 values travel,
scaled by n / k when ``unbiased`` (then E[decode] = x and E||decode - x||^2 / ||x||^2 =
n/k - 1 exactly, Stich et al. 2018; Konecny et al. 2016), as they are otherwise.
"""

from __future__ import annotations

import math

import torch

from fedbat.compressors.base import Compressor, Fields, expect
from fedbat.compressors.registry import register
from fedbat.errors import ConfigError, check_range


@register("randk")
class RandK(Compressor):
    """Rand-k sparsification: k shared-random coordinates, their fp32 values only."""

    shared_randomness = True

    def __init__(self, ratio: float = 0.01, unbiased: bool = True, error_feedback: bool = False):
        super().__init__(error_feedback)
        check_range("ratio", ratio, 0.0, 1.0, low_open=True)
        if not isinstance(unbiased, bool):
            raise ConfigError(f"unbiased={unbiased!r}: must be true or false")
        self.ratio, self.unbiased = float(ratio), unbiased

    def k(self, numel: int) -> int:
        return max(1, math.ceil(self.ratio * numel)) if numel else 0

    def _indices(self, numel: int, shared: torch.Generator) -> torch.Tensor:
        return torch.randperm(numel, generator=shared)[: self.k(numel)]

    def max_payload_bytes(self, shape: tuple[int, ...]) -> int:
        numel = math.prod(shape)
        return 4 * self.k(numel)

    def encode(
        self, x: torch.Tensor, generator: torch.Generator, shared: torch.Generator
    ) -> Fields:
        flat = x.detach().reshape(-1).to(torch.float32).cpu()
        values = flat[self._indices(flat.numel(), shared)]
        if self.unbiased:
            values = values * (flat.numel() / values.numel())
        return {"values": values}

    def decode(self, fields: Fields, shape: torch.Size, shared: torch.Generator) -> torch.Tensor:
        n = math.prod(shape)
        values = expect(fields, "values", torch.float32, self.k(n))
        out = torch.zeros(n)
        out[self._indices(n, shared)] = values
        return out.reshape(shape)
