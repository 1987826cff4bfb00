"""``fedbuff`` (Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation",
AISTATS 2022): clients train whenever they are free, from the model they were sent; the
server aggregates every ``buffer_size`` arrivals, each update discounted by its staleness
tau (server versions since its model), ``(1 + tau) ** -staleness_exponent`` (the paper's
1/sqrt(1 + tau) at 0.5), summed and divided by the buffer size, then applied by server SGD
with ``lr`` (the paper's eta_g). Every arrival counts equally before the discount, as in the
paper (``fed.weight_by`` does not apply). The engine's buffered rounds (``fedbat/buffered.py``)
run it on the virtual clock; ``fed.clients_per_round`` is the number training at once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedbat.errors import check_range
from fedbat.strategies.base import register, weighted_sum
from fedbat.strategies.fedavg import FedAvg


@register("fedbuff")
class FedBuff(FedAvg):
    """Buffered asynchronous FedAvg with staleness-discounted updates."""

    asynchronous = True

    def __init__(
        self, lr: float = 1.0, buffer_size: int = 5, staleness_exponent: float = 0.5
    ) -> None:
        super().__init__(lr)
        check_range("buffer_size", buffer_size, 1, 10**6, integer=True)
        check_range("staleness_exponent", staleness_exponent, 0.0, 10.0)
        self.buffer_size, self.exponent = int(buffer_size), float(staleness_exponent)

    def weight(self, base: float, staleness: int) -> float:
        """``(1 + staleness) ** -staleness_exponent``; the client's own weight is not used.

        >>> FedBuff().weight(600, 3)
        0.5
        """
        return (1.0 + staleness) ** -self.exponent

    def combine(
        self, updates: Sequence[Mapping[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        """``sum_k s(tau_k) delta_k / K`` over the buffer's K updates."""
        summed = weighted_sum(updates, weights, lambda _name, w: w / len(weights))
        return {name: acc.to(torch.float32) for name, acc in summed.items()}
