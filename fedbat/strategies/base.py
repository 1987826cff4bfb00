"""The Strategy interface and its registry (the mechanism the compressors use)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedbat.compressors.base import ClientHook
from fedbat.errors import ConfigError, check_range
from fedbat.registry import ClassRegistry


class Strategy:
    """Server rule. :meth:`apply` moves the global model's parameters by the round's
    weighted mean update ``delta`` (FedAvg: ``w += delta``); buffers (BN statistics,
    counters) always take the mean update directly. Server state lives in the strategy and
    is saved with :meth:`state_dict`. :meth:`client_hook` plugs client-side behaviour into
    local training through the same hook list as a compressor's training hook."""

    name: str = "?"

    def __init__(self, lr: float = 1.0) -> None:
        check_range("lr", lr, 0.0, 100.0, low_open=True)
        self.lr = float(lr)

    def setup(self, params: Mapping[str, nn.Parameter]) -> None:
        """Called once with the global model's parameters, before any round."""
        self.params = dict(params)

    def combine(
        self, updates: list[dict[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        """One update from the round's accepted client updates: their weighted mean (summed
        in float64, in client-id order, so every rank and world size gets the same bits)."""
        total = float(sum(weights))
        out = {}
        for name in updates[0]:
            acc = torch.zeros(updates[0][name].shape, dtype=torch.float64)
            for update, w in zip(updates, weights, strict=True):
                acc += (w / total) * update[name].to(torch.float64)
            out[name] = acc.to(torch.float32)
        return out

    def apply(self, delta: Mapping[str, torch.Tensor]) -> None:
        """Move the parameters given to :meth:`setup` by the round's mean update."""
        raise NotImplementedError

    def client_hook(self, model: nn.Module, held: Mapping[str, torch.Tensor]) -> ClientHook | None:
        """What this strategy adds to a client's local training (FedProx: a loss term)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


STRATEGIES = ClassRegistry("strategy", "strategy")
register = STRATEGIES.register


def build(spec: str | Mapping[str, Any]) -> Strategy:
    """A strategy from a name or the ``strategy`` config group (``{name: ..., **params}``)."""
    if isinstance(spec, str):
        return STRATEGIES.get(spec, key="strategy")
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(
            f"strategy={spec!r}: must name a strategy; "
            f"available: {', '.join(STRATEGIES.available())}"
        )
    params = dict(spec)
    return STRATEGIES.get(params.pop("name"), key="strategy", **params)
