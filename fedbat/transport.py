"""The seam between a round and its clients: how the sampled clients are trained and how
their results reach the server, in this job or over a network."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from fedbat import exchange
from fedbat.client import ClientResult
from fedbat.downlink import Delivery

if TYPE_CHECKING:
    from fedbat.federation import Federation


class Transport(Protocol):
    """How a round's sampled clients are trained and their results reach the server: in
    this job (:class:`InJob`) or over a network (``fedbat.integrations.flower``). The same
    packets travel either way."""

    clients_persist: bool  # whether clients keep what they hold across a resume

    def train(self, fed: Federation, sent_down: list[Delivery], r: int) -> list[ClientResult]:
        """The results of the clients of ``sent_down``, sorted by client id, on every rank."""
        ...

    def round_metrics(self) -> dict[str, float]:
        """What the transport measured in the last round (e.g. bytes on its wire)."""
        ...


class InJob:
    """Rank r trains its share of the clients from ``w_hat`` (what each holds after its
    delivery); the results are all-gathered."""

    clients_persist = True

    def train(self, fed: Federation, sent_down: list[Delivery], r: int) -> list[ClientResult]:
        fabric = fed.fabric
        mine = sent_down[fabric.global_rank :: fabric.world_size]
        return exchange.gather(fabric, [fed.train_client(d.client, r) for d in mine])

    def round_metrics(self) -> dict[str, float]:
        return {}
