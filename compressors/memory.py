"""Error feedback as one reusable piece, apart from any compressor's math.

The residual ``e`` of a (holder, tensor) pair is what compression dropped last time; the
next encode compresses ``x + e`` and keeps ``x + e - decode(encode(x + e))``. Holders are
client ids on the uplink and ``"server"`` on the downlink. Keys are plain strings so the
whole memory is a flat ``dict[str, Tensor]`` that checkpoints as is.
"""

from __future__ import annotations

import torch


class ErrorFeedback:
    """Residual memory keyed by (holder, tensor name).

    >>> ef = ErrorFeedback()
    >>> x = ef.compensate("3", "w", torch.tensor([1.0, -2.0]))
    >>> ef.update("3", "w", x, decoded=torch.tensor([1.5, -1.5]))
    >>> ef.compensate("3", "w", torch.zeros(2))
    tensor([-0.5000, -0.5000])
    """

    def __init__(self, residuals: dict[str, torch.Tensor] | None = None) -> None:
        self.residuals: dict[str, torch.Tensor] = dict(residuals or {})

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

    def of(self, holder: str | int) -> dict[str, torch.Tensor]:
        """The residuals of one holder (what moves when another process trains it next)."""
        prefix = f"{holder}/"
        return {k: v for k, v in self.residuals.items() if k.startswith(prefix)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.residuals)
