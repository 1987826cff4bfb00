"""Strategy wrappers: behaviour that wraps any registered strategy, the shape of Flower's
DP and robustness wrappers. A wrapper delegates everything to the strategy it wraps and
overrides what it adds; ``strategy.wrap`` lists them, the first listed innermost.

Add one: subclass :class:`StrategyWrapper` in this file (or any module imported at start),
decorate it with ``@WRAPPERS.register("name")``; its parameters are its ``__init__``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedbat.compressors.plan import TensorSpec
from fedbat.errors import ConfigError, check_range
from fedbat.hooks import ClientHook
from fedbat.registry import ClassRegistry
from fedbat.strategies.base import Strategy

WRAPPERS = ClassRegistry("strategy.wrap", "strategy wrapper")


class StrategyWrapper(Strategy):
    """Everything delegated to ``inner``; its state is saved under ``inner``."""

    inner: Strategy

    def wrap(self, inner: Strategy) -> StrategyWrapper:
        self.inner, self.lr = inner, inner.lr
        self.transforms_update = self.transforms_update or inner.transforms_update
        self.asynchronous = inner.asynchronous
        return self

    def weight(self, base: float, staleness: int) -> float:
        return self.inner.weight(base, staleness)

    def setup(self, params: Mapping[str, nn.Parameter], num_clients: int = 1) -> None:
        super().setup(params, num_clients)
        self.inner.setup(params, num_clients)

    def extra_plan(self, plan: list[TensorSpec]) -> list[TensorSpec]:
        return self.inner.extra_plan(plan)

    def broadcast_state(self) -> dict[str, torch.Tensor]:
        return self.inner.broadcast_state()

    def client_state_plan(self, plan: list[TensorSpec]) -> list[TensorSpec]:
        return self.inner.client_state_plan(plan)

    def combine(
        self, updates: Sequence[Mapping[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        return self.inner.combine(updates, weights)

    def apply(self, delta: Mapping[str, torch.Tensor]) -> None:
        self.inner.apply(delta)

    def client_hook(
        self,
        model: nn.Module,
        held: Mapping[str, torch.Tensor],
        extra: Mapping[str, torch.Tensor],
        state: Mapping[str, torch.Tensor],
    ) -> ClientHook | None:
        return self.inner.client_hook(model, held, extra, state)

    def metrics(self) -> dict[str, float]:
        return self.inner.metrics()

    def stop_reason(self) -> str:
        return self.inner.stop_reason()

    def describe(self) -> str:
        return self.inner.describe()

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, inner={self.inner!r})"


@WRAPPERS.register("clip")
class Clip(StrategyWrapper):
    """Norm bounding: every client update is scaled to an L2 norm of at most ``max_norm``
    (over all the tensors it sends), on the server before the wrapped rule combines the
    decoded updates (``side: server``, the defence of Sun et al. 2019), or on each client
    before its update is encoded (``side: client``)."""

    def __init__(self, max_norm: float = 1.0, side: str = "server") -> None:
        check_range("max_norm", max_norm, 0.0, 1e12, low_open=True)
        if side not in ("server", "client"):
            raise ConfigError(f"side={side!r}: must be server or client")
        self.max_norm, self.side = float(max_norm), side
        self.transforms_update = side == "client"
        self.clipped: list[bool] = []

    def combine(
        self, updates: Sequence[Mapping[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        if self.side == "client":
            return self.inner.combine(updates, weights)
        self.clipped = []
        return self.inner.combine(_Clipped(updates, self.max_norm, self.clipped), weights)

    def client_hook(
        self,
        model: nn.Module,
        held: Mapping[str, torch.Tensor],
        extra: Mapping[str, torch.Tensor],
        state: Mapping[str, torch.Tensor],
    ) -> ClientHook | None:
        inner = self.inner.client_hook(model, held, extra, state)
        if self.side == "server":
            return inner
        return TransformHook(inner, lambda update: clip(update, self.max_norm)[0])

    def metrics(self) -> dict[str, float]:
        out = self.inner.metrics()
        if self.clipped:
            out["clip/clipped_fraction"] = sum(self.clipped) / len(self.clipped)
        return out


def clip(update: Mapping[str, torch.Tensor], max_norm: float) -> tuple[dict, bool]:
    """``update * min(1, max_norm / ||update||)`` (norm over all tensors, in float64), and
    whether it was scaled.

    >>> out, scaled = clip({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, 1.0)
    >>> out["a"], out["b"], scaled
    (tensor([0.6000]), tensor([0.8000]), True)
    """
    floats = [v for v in update.values() if v.is_floating_point()]
    norm = float(torch.stack([v.double().square().sum() for v in floats]).sum().sqrt())
    if norm <= max_norm:
        return dict(update), False
    factor = max_norm / norm
    return {k: v * factor if v.is_floating_point() else v for k, v in update.items()}, True


class _Clipped(Sequence):
    """The wrapped rule's updates, each clipped when it is read (they decode lazily)."""

    def __init__(
        self, updates: Sequence[Mapping[str, torch.Tensor]], max_norm: float, log: list[bool]
    ) -> None:
        self.updates, self.max_norm, self.log = updates, max_norm, log

    def __len__(self) -> int:
        return len(self.updates)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        out, scaled = clip(self.updates[i], self.max_norm)
        if len(self.log) < len(self.updates):  # a rule may read an update twice
            self.log.append(scaled)
        return out


class TransformHook(ClientHook):
    """The wrapped strategy's hook, then ``fn`` on the update before it is encoded."""

    def __init__(
        self, inner: ClientHook | None, fn: Callable[[dict[str, torch.Tensor]], dict]
    ) -> None:
        self.inner, self.fn = inner or ClientHook(), fn

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.inner.loss(loss)

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.inner.before_step(optimizer)

    def after_step(self, step: int) -> None:
        self.inner.after_step(step)

    def transform(self, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.fn(self.inner.transform(update))

    def message(self, sent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.inner.message(sent)

    def client_state(self) -> dict[str, torch.Tensor]:
        return self.inner.client_state()


def wrap(strategy: Strategy, specs: Sequence[Any]) -> Strategy:
    """``strategy`` inside the wrappers ``specs`` (names or ``{name: ..., **params}``), the
    first innermost."""
    for i, spec in enumerate(specs):
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise ConfigError(
                f"strategy.wrap[{i}]={spec!r}: must name a wrapper; "
                f"available: {', '.join(WRAPPERS.available())}"
            )
        params = dict(spec)
        wrapper = WRAPPERS.get(params.pop("name"), key=f"strategy.wrap[{i}]", **params)
        strategy = wrapper.wrap(strategy)
    return strategy
