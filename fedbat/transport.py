"""The seam between a round and its clients: how the sampled clients are trained and how
their results reach the server, in this job or over a network.

A transport sees a :class:`RoundContext` (what to deliver to whom, the full model on demand,
the schedule, a way to train a client in this process), never the federation, and returns
:class:`Trained`: the results and the clients whose state it lost. The round applies what
follows from that itself (a lost client is sent the full model next time)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from lightning.fabric import Fabric

from fedbat import exchange
from fedbat.client import ClientResult
from fedbat.downlink import Delivery
from fedbat.optimization import ServerSchedule


@dataclass(frozen=True, kw_only=True)
class RoundContext:
    """What a transport needs of one round."""

    index: int  # the round, 0-based
    deliveries: list[Delivery]  # the sampled clients, in id order, and what each is sent
    num_clients: int
    client_size: Callable[[int], int]  # a client's number of samples
    full_model: Callable[[], bytes]  # the full-model packet (``w_hat``), encoded on demand
    chain_packet: Callable[[int], bytes]  # the broadcast packet of round j
    schedule: ServerSchedule
    train_local: Callable[[int], ClientResult]  # train a client in this process
    fabric: Fabric


@dataclass
class Trained:
    """A round's results, sorted by client id and equal on every rank, and the clients whose
    state the transport can no longer vouch for (a node that failed or vanished)."""

    results: list[ClientResult]
    lost: set[int] = field(default_factory=set)


class Transport(Protocol):
    """How a round's sampled clients are trained and their results reach the server: in
    this job (:class:`InJob`) or over a network (``fedbat.integrations.flower``). The same
    packets travel either way."""

    clients_persist: bool  # whether clients keep what they hold across a resume

    def train(self, ctx: RoundContext) -> Trained:
        """The results of the clients of ``ctx.deliveries``."""
        ...

    def round_metrics(self) -> dict[str, float]:
        """What the transport measured in the last round (e.g. bytes on its wire)."""
        ...


class InJob:
    """Rank r trains its share of the clients from ``w_hat`` (what each holds after its
    delivery); the results are all-gathered."""

    clients_persist = True

    def train(self, ctx: RoundContext) -> Trained:
        fabric = ctx.fabric
        mine = ctx.deliveries[fabric.global_rank :: fabric.world_size]
        return Trained(exchange.gather(fabric, [ctx.train_local(d.client) for d in mine]))

    def round_metrics(self) -> dict[str, float]:
        return {}
