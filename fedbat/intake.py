"""What the server takes in (docs/architecture.md, "One round", step 6): a round's packets,
each decoded and checked (malformed, non-finite, an update too large to be a training step)
while the strategy's ``combine`` reads it. When every packet is valid each is decoded once,
and a round's decoded updates are never all in memory together; one invalid packet stops
the combination, which then runs again over the valid ones."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedbat.compressors import Compressor, TensorSpec, decode_update
from fedbat.compressors.base import float32_norm
from fedbat.compressors.update import SharedSeed
from fedbat.errors import PacketError

MAX_COUNTER_STEP = 2**31  # integer buffers (BN's num_batches_tracked) grow by steps taken


@dataclass(frozen=True)
class Candidate:
    """A packet that passed the round's bookkeeping (sampled, once, trained): its bytes still
    have to be read."""

    client: int
    data: bytes
    shared: SharedSeed  # the randomness its sender derived
    weight: float  # its aggregation weight, were it accepted
    train_loss: float


class Invalid(Exception):
    """Candidate ``index``'s packet is invalid, for ``reason``."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index, self.reason = index, reason


@dataclass(frozen=True)
class Reader:
    """How the server reads a packet: its plan, the uplink compressor, the tensors whose
    fields honest training shapes (``learned``), and the bound on an update's L2 norm."""

    plan: list[TensorSpec]
    uplink: Compressor
    learned: frozenset[str]
    bound: float

    def read(self, c: Candidate) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The update and per-tensor stats of ``c``; PacketError when it is invalid."""
        update, stats = decode_update(c.data, self.plan, self.uplink, self.learned, c.shared)
        check_scale(update, self.bound)
        return update, stats


class Checked(Sequence):
    """Candidates as updates, each decoded and checked when indexed (:class:`Invalid` when it
    fails); ``stats`` holds what was read, by index."""

    def __init__(self, candidates: list[Candidate], reader: Reader) -> None:
        self.candidates, self.reader = candidates, reader
        self.stats: dict[int, dict[str, float]] = {}

    def __len__(self) -> int:
        return len(self.candidates)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        try:
            update, self.stats[i] = self.reader.read(self.candidates[i])
        except PacketError as err:
            raise Invalid(i, str(err)) from None
        return update

    def read_the_rest(self) -> None:
        """Check the candidates a rule did not read: none is accepted unread."""
        for i in range(len(self)):
            if i not in self.stats:
                self[i]


def check_scale(update: dict[str, torch.Tensor], bound: float) -> None:
    """Refuse an update whose L2 norm exceeds ``bound``, or whose integer tensors (counters)
    step further than any training does."""
    floats = [u for u in update.values() if u.is_floating_point()]
    # float32 norms first: their error is far below the factor 2, and an honest update is
    # orders of magnitude inside the bound; near it (or past float32) the exact one decides
    quick = float32_norm(floats) if math.isfinite(bound) else 0.0
    if quick is None or not quick <= bound / 2:
        exact = norm(floats)
        if exact > bound:
            raise PacketError(
                f"update norm {exact:.3g} exceeds the bound {bound:.3g} (fed.max_update_ratio)"
            )
    for name, u in update.items():
        if not u.is_floating_point() and u.numel() and int(u.abs().max()) > MAX_COUNTER_STEP:
            raise PacketError(f"{name}: counter step {int(u.abs().max())} > {MAX_COUNTER_STEP}")


def norm(tensors: list[torch.Tensor]) -> float:
    """The L2 norm of all of ``tensors`` together, accumulated in float64 (a half-precision
    update's norm would overflow its own dtype past 65504, and float32 sums drift by 1e-3 over
    a million elements) without a float64 copy of any tensor.

    >>> norm([torch.tensor([3.0]), torch.tensor([4.0], dtype=torch.float16)])
    5.0
    """
    if not tensors:
        return 0.0
    norms = torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors])
    return float(torch.linalg.vector_norm(norms, dtype=torch.float64))
