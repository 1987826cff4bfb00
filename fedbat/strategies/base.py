"""The Strategy interface and its registry (the mechanism the compressors use)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedbat.compressors.plan import TensorSpec
from fedbat.errors import check_range
from fedbat.hooks import ClientHook
from fedbat.registry import ClassRegistry


class Strategy:
    """Server rule. :meth:`apply` moves the global model's parameters by the round's
    weighted mean update ``delta`` (FedAvg: ``w += delta``); buffers (BN statistics,
    counters) always take the mean update directly. Server state lives in the strategy and
    is saved with :meth:`state_dict`. :meth:`client_hook` plugs client-side behaviour into
    local training through the same hook list as a compressor's training hook.

    A strategy may add tensors to the packets of both directions (:meth:`extra_plan`):
    what the server broadcasts beside the model (:meth:`broadcast_state`) and what each
    client's hook adds to its update (``ClientHook.message``). They travel through the
    configured compressors and count in ``bits/*`` like the model."""

    name: str = "?"
    transforms_update = False  # a client hook of it changes the update (``ClientHook.transform``)
    asynchronous = False  # rounds are buffered arrivals of clients that trained from older models

    def weight(self, base: float, staleness: int) -> float:
        """An accepted update's aggregation weight, from its client's (``fed.weight_by``) and
        the rounds its model is behind the server's (0 in synchronous rounds)."""
        return base

    def __init__(self, lr: float = 1.0) -> None:
        check_range("lr", lr, 0.0, 100.0, low_open=True)
        self.lr = float(lr)

    def setup(self, params: Mapping[str, nn.Parameter], num_clients: int = 1) -> None:
        """Called once with the global model's parameters and the client population, before
        any round."""
        self.params = dict(params)
        self.num_clients = num_clients

    def extra_plan(self, plan: list[TensorSpec]) -> list[TensorSpec]:
        """The tensors this strategy adds to every packet, given the model's plan."""
        return []

    def broadcast_state(self) -> dict[str, torch.Tensor]:
        """The server tensors every client must hold (named as in :meth:`extra_plan`)."""
        return {}

    def client_state_plan(self, plan: list[TensorSpec]) -> list[TensorSpec]:
        """The tensors a client's hook may keep between rounds (``ClientHook.client_state``):
        a stored state that holds anything else is damaged."""
        return []

    def combine(
        self, updates: Sequence[Mapping[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        """One update from the round's accepted client updates: their weighted mean (summed
        in float64, in client-id order, so every rank and world size gets the same bits).

        The server's ``updates`` decodes a client's packet each time it is indexed, so that
        a round's decoded updates are never all in memory: walk it once; a rule that needs
        them all at once (the median) takes ``list(updates)``."""
        total = float(sum(weights))
        summed = weighted_sum(updates, weights, lambda _name, w: w / total)
        return {name: acc.to(torch.float32) for name, acc in summed.items()}

    def apply(self, delta: Mapping[str, torch.Tensor]) -> None:
        """Move the parameters given to :meth:`setup` by the round's mean update."""
        raise NotImplementedError

    def client_hook(
        self,
        model: nn.Module,
        held: Mapping[str, torch.Tensor],
        extra: Mapping[str, torch.Tensor],
        state: Mapping[str, torch.Tensor],
    ) -> ClientHook | None:
        """What this strategy adds to a client's local training (FedProx: a loss term), given
        the weights the client holds, the :meth:`broadcast_state` it holds, and its own
        state from the last time it was sampled (empty the first time)."""
        return None

    def metrics(self) -> dict[str, float]:
        """Figures of the last :meth:`combine` worth logging, by their logged names."""
        return {}

    def stop_reason(self) -> str:
        """Why the run must end before its next round (a privacy budget spent); "" goes on."""
        return ""

    def describe(self) -> str:
        """A line said at the start of a run when the rule changes what clients' updates
        mean (privacy: clipping, weights, noise); "" says nothing."""
        return ""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def weighted_sum(
    updates: Iterable[Mapping[str, torch.Tensor]],
    weights: Iterable[float],
    coef: Callable[[str, float], float],
) -> dict[str, torch.Tensor]:
    """``sum_i coef(name, weight_i) * update_i[name]`` per tensor in float64, in the order
    given, in one pass over ``updates``.

    >>> ups = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 0.0])}]
    >>> weighted_sum(ups, [1, 3], lambda name, w: w / 4)["w"]
    tensor([2.5000, 0.5000], dtype=torch.float64)
    """
    acc: dict[str, torch.Tensor] = {}
    term: list[torch.Tensor] = []  # one float64 product per tensor, reused by every update
    for update, w in zip(updates, weights, strict=True):
        if not acc:
            acc = {name: torch.zeros(v.shape, dtype=torch.float64) for name, v in update.items()}
            term = [torch.empty(v.shape, dtype=torch.float64) for v in update.values()]
        if update.keys() != acc.keys():
            raise ValueError(f"an update of tensors {list(update)}, the first's {list(acc)}")
        # one call per step for all tensors: a cross-device round sums a thousand updates
        torch._foreach_copy_(term, [update[name] for name in acc])
        torch._foreach_mul_(term, [coef(name, w) for name in acc])
        torch._foreach_add_(list(acc.values()), term)
    return acc


STRATEGIES = ClassRegistry("strategy", "strategy")
register = STRATEGIES.register
