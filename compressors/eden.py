"""``eden`` (Vargaftik et al., ICML 2022): DRIVE's shared random rotation, then b bits per
coordinate, any real b in (0, 8].

Per block (``drive.blocks``), the rotated y = R x is normalised to unit variance
(z = y sqrt(d) / ||x||) and each coordinate sent as the index of its nearest Lloyd-Max
centroid of the standard normal at its bit width; one fp32 scale S = ||x||^2 / <y, q> per
block makes the estimate R^T (S q) unbiased. A fractional b sends ceil(b) bits on a shared
Bernoulli(b - floor(b)) share of the coordinates and floor(b) on the rest (0 bits: the
coordinate is sent as 0), the split derived by both ends, never sent. With D the Lloyd-Max
distortion of N(0, 1) at b bits, the vNMSE tends to D / (1 - D): pi/2 - 1 at b = 1 (DRIVE).
"""

from __future__ import annotations

import functools
import math

import torch

from fedbat.compressors.base import Compressor, Fields, expect
from fedbat.compressors.bits import pack_uint, unpack_uint
from fedbat.compressors.drive import blocks, hadamard, random_signs
from fedbat.compressors.registry import register
from fedbat.errors import PacketError, check_range


@functools.cache
def lloyd_max(bits: int, iterations: int = 2000) -> tuple[torch.Tensor, float]:
    """The 2^bits Lloyd-Max centroids of N(0, 1), ascending, and their distortion
    E(Z - Q(Z))^2, by Lloyd's iteration on the density (float64).

    >>> c, d = lloyd_max(1)
    >>> [round(v, 4) for v in c.tolist()], round(d, 4)
    ([-0.7979, 0.7979], 0.3634)
    """
    levels = 2**bits
    c = NORMAL.icdf(torch.arange(1, levels + 1, dtype=torch.float64) / (levels + 1))
    for _ in range(iterations):
        edges, mass = _cells(c)
        pdf = NORMAL.log_prob(edges.clamp(-40, 40)).exp()
        c = (pdf[:-1] - pdf[1:]) / mass  # E[Z | a < Z < b]
    _, mass = _cells(c)
    return c.to(torch.float32), float(1 - (mass * c.square()).sum())


NORMAL = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)


def _cells(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cell edges of centroids ``c`` (midpoints, and +-inf) and each cell's mass."""
    inf = torch.tensor([math.inf], dtype=torch.float64)
    edges = torch.cat([-inf, (c[1:] + c[:-1]) / 2, inf])
    return edges, NORMAL.cdf(edges[1:]) - NORMAL.cdf(edges[:-1])


@register("eden")
class Eden(Compressor):
    """EDEN: b bits per coordinate after a shared random rotation, unbiased; any b in (0, 8]."""

    shared_randomness = True

    def __init__(self, bits: float = 1.0, error_feedback: bool = False) -> None:
        super().__init__(error_feedback)
        check_range("bits", bits, 0.0, 8.0, low_open=True)
        self.bits = float(bits)
        self.low, self.high = math.floor(self.bits), math.ceil(self.bits)

    def _widths(self, d: int, shared: torch.Generator) -> torch.Tensor:
        """Each rotated coordinate's bit width (the shared Bernoulli split of a fractional b)."""
        if self.low == self.high:
            return torch.full((d,), self.low)
        high = torch.rand(d, generator=shared) < self.bits - self.low
        return torch.where(high, self.high, self.low)

    def max_payload_bytes(self, shape: tuple[int, ...]) -> int:
        numel = math.prod(shape)
        sizes = blocks(numel)
        d = sum(r for _, r in sizes)
        return (d * self.high + 7) // 8 + 2 + 4 * len(sizes)

    def encode(
        self, x: torch.Tensor, generator: torch.Generator, shared: torch.Generator
    ) -> Fields:
        flat = x.detach().reshape(-1).to(torch.float32).cpu()
        sizes = blocks(flat.numel())
        codes, widths, scales = [], [], []
        for part, (n, d) in zip(flat.split([n for n, _ in sizes]), sizes, strict=True):
            diag = random_signs(d, shared)
            y = hadamard(diag * torch.nn.functional.pad(part, (0, d - n)))
            width = self._widths(d, shared)
            norm = float(part.double().square().sum().sqrt())
            z = y * (math.sqrt(d) / norm) if norm > 0 else y
            q, code = torch.zeros(d), torch.zeros(d, dtype=torch.int64)
            for w in {self.low, self.high} - {0}:
                book = lloyd_max(w)[0]
                on = width == w
                code[on] = torch.bucketize(z[on], (book[1:] + book[:-1]) / 2)
                q[on] = book[code[on]]
            dot = float((y.double() * q.double()).sum())
            scales.append(norm**2 / dot if dot > 0 else 0.0)
            codes.append(code)
            widths.append(width)
        code, width = torch.cat(codes), torch.cat(widths)
        fields = {"scale": torch.tensor(scales, dtype=torch.float32)}
        for key, w in (("low", self.low), ("high", self.high)):
            if w and (key == "low" or self.high != self.low):
                fields[key] = pack_uint(code[width == w], w)
        return fields

    def decode(self, fields: Fields, shape: torch.Size, shared: torch.Generator) -> torch.Tensor:
        sizes = blocks(math.prod(shape))
        scales = expect(fields, "scale", torch.float32, len(sizes))
        if bool((scales < 0).any()):
            raise PacketError("field 'scale': a negative scale")
        diags, widths = [], []
        for _, d in sizes:  # the shared draws, in the encoder's order
            diags.append(random_signs(d, shared))
            widths.append(self._widths(d, shared))
        width = torch.cat(widths) if widths else torch.zeros(0, dtype=torch.int64)
        q = torch.zeros(width.numel())
        for key, w in (("low", self.low), ("high", self.high)):
            if w and (key == "low" or self.high != self.low):
                count = int((width == w).sum())
                packed = expect(fields, key, torch.uint8, (count * w + 7) // 8)
                q[width == w] = lloyd_max(w)[0][unpack_uint(packed, w, count)]
        parts, start = [], 0
        for (n, d), s, diag in zip(sizes, scales, diags, strict=True):
            parts.append((diag * hadamard(s * q[start : start + d]))[:n])
            start += d
        return (torch.cat(parts) if parts else torch.zeros(0)).reshape(shape)
