"""``median`` and ``trimmed_mean``: coordinate-wise robust combinations of the round's
updates (Yin et al. 2018), so that a minority of poisoned updates that pass validation
(finite, within ``fed.max_update_ratio``) cannot drag the global model far. Both ignore the
clients' sample weights, as robust statistics do; the server step is FedAvg's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedbat.errors import check_range
from fedbat.strategies.base import register
from fedbat.strategies.fedavg import FedAvg


def _sorted_stack(updates: list[Mapping[str, torch.Tensor]], name: str) -> torch.Tensor:
    return torch.stack([u[name].to(torch.float64) for u in updates]).sort(dim=0).values


@register("median")
class Median(FedAvg):
    """Coordinate-wise median of the accepted updates (the mean of the two middle values
    for an even count)."""

    def combine(
        self, updates: Sequence[Mapping[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        updates = list(updates)  # every update at once: a median needs them all
        n, out = len(updates), {}
        for name in updates[0]:
            s = _sorted_stack(updates, name)
            out[name] = ((s[(n - 1) // 2] + s[n // 2]) / 2).to(torch.float32)
        return out


@register("trimmed_mean")
class TrimmedMean(FedAvg):
    """Coordinate-wise mean after dropping the ``trim`` fraction of the largest and of the
    smallest values (at least one value stays)."""

    def __init__(self, lr: float = 1.0, momentum: float = 0.0, trim: float = 0.1) -> None:
        super().__init__(lr, momentum)
        check_range("trim", trim, 0.0, 0.499)
        self.trim = float(trim)

    def combine(
        self, updates: Sequence[Mapping[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        updates = list(updates)
        n = len(updates)
        k = min(int(self.trim * n), (n - 1) // 2)
        return {
            name: _sorted_stack(updates, name)[k : n - k].mean(dim=0).to(torch.float32)
            for name in updates[0]
        }
