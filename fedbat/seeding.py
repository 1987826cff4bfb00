"""Stateless seeding: every random draw of a run is a function of (seed, round, who).

Because nothing carries RNG state from one round to the next, a resumed run and a run on
any number of processes draw exactly the same numbers as an uninterrupted 1-process run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

DOWNLINK = -1  # the "who" of the server's downlink draws
BN_PROXY = -2  # the "who" of the draw of fed.bn_stats=recompute's proxy clients


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts.

    >>> derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
    True
    """
    return int(
        np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1
    )


def generator(*parts: int) -> torch.Generator:
    """A CPU torch.Generator seeded by :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def seed_torch(seed: int, device: torch.device) -> None:
    """Seed torch's global generators for work on ``device``. On a CPU only the CPU's:
    ``torch.manual_seed`` also queues a seed for every accelerator torch knows, a stack
    trace each, about a millisecond a call, which a thousand clients a round pay."""
    if device.type == "cpu":
        torch.random.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def sample_clients(seed: int, round_idx: int, num_clients: int, per_round: int) -> list[int]:
    """The round's participants, sorted (the order packets are aggregated in).

    >>> sample_clients(0, 0, 100, 3) == sample_clients(0, 0, 100, 3)
    True
    """
    return sample_from(range(num_clients), per_round, seed, round_idx)


def sample_from(candidates: Sequence[int], k: int, *parts: int) -> list[int]:
    """``k`` of ``candidates`` without replacement, sorted, drawn from the seed of ``parts``
    (over ``range(n)`` exactly :func:`sample_clients`'s draw)."""
    rng = np.random.default_rng(derive_seed(*parts))
    return sorted(int(candidates[int(i)]) for i in rng.choice(len(candidates), k, replace=False))
