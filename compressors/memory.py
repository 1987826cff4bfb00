"""What a link remembers between packets, apart from any compressor's math: error-feedback
residuals, and the state a compressor keeps of its own (``Compressor.keeps_state``, e.g.
PowerSGD's warm-started factor).

The residual ``e`` of a (holder, tensor) pair is what compression dropped last time; the
next encode compresses ``x + e`` and keeps ``x + e - decode(encode(x + e))``. A compressor's
state is a small dict of tensors per (holder, tensor), handed to its next ``encode``. Holders
are client ids on the uplink and ``"server"`` on the downlink. Keys are plain strings
(``holder/tensor`` and ``holder/tensor/field``) so both are flat ``dict[str, Tensor]`` that
checkpoint as they are.
"""

from __future__ import annotations

import torch

from fedbat.compressors.base import Fields


class Memory:
    """Residuals and compressor state keyed by (holder, tensor name).

    >>> ef = Memory()
    >>> x = ef.compensate("3", "w", torch.tensor([1.0, -2.0]))
    >>> ef.update("3", "w", x, decoded=torch.tensor([1.5, -1.5]))
    >>> ef.compensate("3", "w", torch.zeros(2))
    tensor([-0.5000, -0.5000])
    >>> ef.keep("3", "w", {"q": torch.ones(1)}); ef.state("3", "w"), ef.state_of("3")
    ({'q': tensor([1.])}, {'w/q': tensor([1.])})
    """

    def __init__(
        self,
        residuals: dict[str, torch.Tensor] | None = None,
        states: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.residuals: dict[str, torch.Tensor] = dict(residuals or {})
        self.states: dict[str, torch.Tensor] = dict(states or {})

    @staticmethod
    def key(holder: str | int, name: str) -> str:
        return f"{holder}/{name}"

    def compensate(self, holder: str | int, name: str, x: torch.Tensor) -> torch.Tensor:
        e = self.residuals.get(self.key(holder, name))
        return x if e is None else x + e

    def update(
        self, holder: str | int, name: str, compensated: torch.Tensor, decoded: torch.Tensor
    ) -> None:
        self.residuals[self.key(holder, name)] = compensated - decoded

    def state(self, holder: str | int, name: str) -> Fields:
        """The compressor's state for this tensor from its last encode ({} before any)."""
        prefix = self.key(holder, name) + "/"
        return {k[len(prefix) :]: v for k, v in self.states.items() if k.startswith(prefix)}

    def keep(self, holder: str | int, name: str, state: Fields) -> None:
        prefix = self.key(holder, name) + "/"
        self.states = {k: v for k, v in self.states.items() if not k.startswith(prefix)}
        self.states |= {prefix + k: v for k, v in state.items()}

    def of(self, holder: str | int) -> dict[str, torch.Tensor]:
        """The residuals of one holder by tensor name (what moves when another process
        trains it next)."""
        return _strip(self.residuals, holder)

    def state_of(self, holder: str | int) -> dict[str, torch.Tensor]:
        """The compressor state of one holder, keyed ``tensor/field``."""
        return _strip(self.states, holder)

    @classmethod
    def of_holder(
        cls, holder: str | int, residuals: dict[str, torch.Tensor], states: dict[str, torch.Tensor]
    ) -> Memory:
        """One holder's memory from :meth:`of` and :meth:`state_of`."""
        return cls(
            {cls.key(holder, k): v for k, v in residuals.items()},
            {cls.key(holder, k): v for k, v in states.items()},
        )


def _strip(tensors: dict[str, torch.Tensor], holder: str | int) -> dict[str, torch.Tensor]:
    prefix = f"{holder}/"
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
