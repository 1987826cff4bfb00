"""``drive`` (Vargaftik et al., NeurIPS 2021): one bit per coordinate after a random
rotation both ends derive from the link's shared randomness (``SharedSeed``), never sent.

Each block x of d elements (d a power of two) is rotated by R = H D / sqrt(d): D a random
diagonal of +-1, H the Walsh-Hadamard matrix (applied in O(d log d)). The signs of y = R x
travel, d bits, with one fp32 scale S = ||x||^2 / ||y||_1, the scale that makes the estimate
unbiased; the receiver returns R^T (S sign(y)). Its vNMSE E||x_hat - x||^2 / ||x||^2 tends
to pi/2 - 1 = 0.571 as d grows (the paper's Theorem 3), whatever x is, where signSGD's
depends on x and can be far worse. A randomized Hadamard rotation is close to a uniformly
random one only for large d, so a tensor of n elements is cut into the powers of two of n's
binary form that are at least 1,024, largest first (294,912 = 2^18 + 2^15), and what
remains (under 1,024) is one block zero-padded to the next power of two: at most 1,023
padding bits a tensor, where padding the whole tensor, as the paper's code does, costs up
to n.
"""

from __future__ import annotations

import math

import torch

from fedbat.compressors.base import Compressor, Fields, expect
from fedbat.compressors.bits import pack_bits, unpack_bits
from fedbat.compressors.registry import register
from fedbat.errors import PacketError


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """The normalised Walsh-Hadamard transform H x / sqrt(d) of a vector of length d = 2^m:
    orthogonal and its own inverse.

    >>> hadamard(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    tensor([0.5000, 0.5000, 0.5000, 0.5000])
    """
    d, h, y = x.numel(), 1, x.reshape(-1)
    while h < d:
        pairs = y.view(-1, 2, h)
        y = torch.stack([pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]], dim=1).view(-1)
        h *= 2
    return y / math.sqrt(d)


def random_signs(d: int, shared: torch.Generator) -> torch.Tensor:
    """The rotation's diagonal D: d independent +-1 from the link's shared generator."""
    return torch.randint(0, 2, (d,), generator=shared).to(torch.float32) * 2 - 1


MIN_BLOCK = 1024


def blocks(numel: int) -> list[tuple[int, int]]:
    """(elements, rotated size) of each block of a tensor of ``numel`` elements.

    >>> blocks(294912), blocks(2560), blocks(288)
    ([(262144, 262144), (32768, 32768)], [(2048, 2048), (512, 512)], [(288, 512)])
    """
    big = [1 << b for b in range(numel.bit_length() - 1, -1, -1) if numel >> b & 1]
    big = [d for d in big if d >= MIN_BLOCK]
    rest = numel - sum(big)
    return [(d, d) for d in big] + ([(rest, 1 << (rest - 1).bit_length())] if rest else [])


@register("drive")
class Drive(Compressor):
    """DRIVE: 1 bit per coordinate after a shared random rotation, unbiased."""

    shared_randomness = True

    def max_payload_bytes(self, shape: tuple[int, ...]) -> int:
        numel = math.prod(shape)
        sizes = blocks(numel)
        return (sum(d for _, d in sizes) + 7) // 8 + 4 * len(sizes)

    def encode(
        self, x: torch.Tensor, generator: torch.Generator, shared: torch.Generator
    ) -> Fields:
        flat = x.detach().reshape(-1).to(torch.float32).cpu()
        sizes = blocks(flat.numel())
        signs, scales = [], []
        for part, (n, d) in zip(flat.split([n for n, _ in sizes]), sizes, strict=True):
            y = hadamard(random_signs(d, shared) * torch.nn.functional.pad(part, (0, d - n)))
            l1 = y.abs().double().sum()
            scales.append(float(part.double().square().sum() / l1) if l1 > 0 else 0.0)
            signs.append(y >= 0)
        signs_all = torch.cat(signs) if signs else torch.zeros(0, dtype=torch.bool)
        return {"signs": pack_bits(signs_all), "scale": torch.tensor(scales, dtype=torch.float32)}

    def decode(self, fields: Fields, shape: torch.Size, shared: torch.Generator) -> torch.Tensor:
        sizes = blocks(math.prod(shape))
        rotated = [d for _, d in sizes]
        signs = expect(fields, "signs", torch.uint8, (sum(rotated) + 7) // 8)
        scales = expect(fields, "scale", torch.float32, len(sizes))
        if bool((scales < 0).any()):
            raise PacketError("field 'scale': a negative scale")
        bits = unpack_bits(signs, sum(rotated)).to(torch.float32) * 2 - 1
        parts = [
            (random_signs(d, shared) * hadamard(s * b))[:n]
            for (n, d), s, b in zip(sizes, scales, bits.split(rotated), strict=True)
        ]
        return (torch.cat(parts) if parts else torch.zeros(0)).reshape(shape)
