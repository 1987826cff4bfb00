"""``powersgd`` (Vogels et al., NeurIPS 2019): a rank-r approximation by one power iteration.

A tensor is seen as a matrix M, n x m (a conv weight as out x in*kh*kw). From the sender's
factor Q (m x r) of its last packet of this tensor, or a Gaussian draw at first:
P = orthonormalize(M Q) (a reduced QR), Q' = M^T P; P and Q' travel in fp32 (32 r (n + m)
bits for n m coordinates) and the receiver decodes P Q'^T. Q' is kept for the next round
(the warm start: each round continues the power iteration), per client on the uplink and on
the server for the downlink, through the generic compressor state (``compressors/memory.py``).
When rank M <= r (and generic Q) the decode is M itself. Biased, so error feedback is on by
default, as in the paper; r = min(rank, n, m).
"""

from __future__ import annotations

import math

import torch

from fedbat.compressors.base import Compressor, Fields, all_finite, expect
from fedbat.compressors.registry import register
from fedbat.errors import ConfigError, PacketError


@register("powersgd")
class PowerSGD(Compressor):
    """PowerSGD: the factors of one warm-started power iteration, rank ``rank``."""

    keeps_state = True

    def __init__(self, rank: int = 1, error_feedback: bool = True) -> None:
        super().__init__(error_feedback)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"rank={rank!r}: must be an integer >= 1")
        self.rank = rank

    def factors(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(n, m, r): the matrix a tensor of ``shape`` is seen as, and the rank used."""
        n = shape[0] if shape else 1
        m = math.prod(shape) // n if n else 0
        return n, m, min(self.rank, n, m)

    def max_payload_bytes(self, shape: tuple[int, ...]) -> int:
        n, m, r = self.factors(shape)
        return 4 * r * (n + m)

    def state_plan(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        _, m, r = self.factors(shape)
        return {"q": ((m, r), torch.float32)}

    def encode(
        self, x: torch.Tensor, generator: torch.Generator, state: Fields
    ) -> tuple[Fields, Fields]:
        n, m, r = self.factors(tuple(x.shape))
        mat = x.detach().reshape(n, m).to(torch.float32).cpu()
        q = state.get("q")
        if q is None:
            q = torch.randn(m, r, generator=generator)
        p = torch.linalg.qr(mat @ q).Q
        q = mat.T @ p
        return {"p": p.reshape(-1), "q": q.reshape(-1)}, {"q": q}

    def decode(self, fields: Fields, shape: torch.Size) -> torch.Tensor:
        n, m, r = self.factors(tuple(shape))
        p = expect(fields, "p", torch.float32, n * r).reshape(n, r)
        q = expect(fields, "q", torch.float32, m * r).reshape(m, r)
        out = p @ q.T
        if not all_finite(out):
            raise PacketError("factors whose product overflows")
        return out.reshape(shape)
