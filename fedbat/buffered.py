"""Buffered asynchronous rounds (FedBuff, ``strategy=fedbuff``) on the virtual clock.

``fed.clients_per_round`` clients train at once. A client starts when a slot is free (at the
start of a round, and each time one arrives or drops out), drawn from those online that are
neither training nor waiting in the buffer; it is sent the server's current model (the
broadcasts it missed, as in synchronous rounds) and trains from it; its update arrives when
its download, compute and upload would be done on its device (``fedbat/devices.py``), or
never when it goes offline first. A round takes the first ``buffer_size`` arrivals (in
arrival order, ties by client id) and aggregates them, each discounted by its staleness.
Who starts is drawn from (seed, round, start), so a run is deterministic; what is in flight
(clients, the rounds they trained in, their packets) is checkpointed with the round.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fedbat.client import ClientResult
from fedbat.devices import Clock
from fedbat.downlink import Delivery
from fedbat.seeding import sample_from

BUFFERED = -4  # the "who" part of the seeds of the clients buffered rounds start


@dataclass
class Flight:
    """A client in training: the round it was sent the model of (and trained in), when its
    update arrives or it drops out, and its result (None: it drops out)."""

    client: int
    version: int
    arrives: float
    result: ClientResult | None


@dataclass
class BufferedRound:
    """What one buffered round saw: the arrivals it aggregates, the deliveries of the clients
    it started, those that dropped out, and whose held model is unknown."""

    arrived: list[Flight] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    dropped: int = 0
    unknown: set[int] = field(default_factory=set)


class Buffered:
    """The clients in flight between rounds and the event order of a round."""

    def __init__(self, clock: Clock, concurrency: int, buffer_size: int, seed: int) -> None:
        self.clock, self.concurrency, self.buffer_size = clock, concurrency, buffer_size
        self.seed = seed
        self.flights: list[Flight] = []

    def play(
        self,
        r: int,
        deliver: Callable[[list[int]], list[Delivery]],
        train: Callable[[list[Delivery]], list[ClientResult]],
        samples: Callable[[int], int],
    ) -> BufferedRound:
        """Round ``r``: fill the free slots, then take arrivals until the buffer is full,
        starting a client in each slot that frees before then. ``deliver`` sends clients the
        current model, ``train`` trains them from it, ``samples`` is a client's local
        samples (epochs x its data)."""
        out, starts = BufferedRound(), 0

        def start(at: float, count: int) -> None:
            nonlocal starts
            busy = {f.client for f in self.flights} | {f.client for f in out.arrived}
            free = [c for c in self.clock.devices.online(at) if c not in busy]
            if not (k := min(count, len(free))):
                return
            sent = deliver(sample_from(free, k, self.seed, BUFFERED, r, starts))
            starts += 1
            out.deliveries += sent
            results = {res.client: res for res in train(sent)}
            for d in sent:
                self.flights.append(self._flight(d, results[d.client], at, samples, r, out))

        start(self.clock.now, self.concurrency - len(self.flights))
        while len(out.arrived) < self.buffer_size:
            if not self.flights:  # nobody online was free: wait for someone to come online
                at = self.clock.first_online()
                if at is None:
                    break
                self.clock.now = at
                start(at, self.concurrency)
                if not self.flights:
                    break
                continue
            f = min(self.flights, key=lambda f: (f.arrives, f.client))
            self.flights.remove(f)
            self.clock.now = max(self.clock.now, f.arrives)
            if f.result is None:
                out.dropped += 1
            else:
                out.arrived.append(f)
            if len(out.arrived) < self.buffer_size:
                start(f.arrives, 1)
        return out

    def _flight(
        self,
        d: Delivery,
        res: ClientResult,
        at: float,
        samples: Callable[[int], int],
        r: int,
        out: BufferedRound,
    ) -> Flight:
        """When ``d.client``'s update arrives (or it drops out), started at ``at``."""
        p = self.clock.devices.profile(d.client)
        received = p.received(at, d.bits)
        done = p.uploaded(p.computed(received, samples(d.client)), 8 * len(res.data))
        off = self.clock.devices.offline_at(d.client, at)
        off = math.inf if off is None else off
        if off < done:
            if off < received:
                out.unknown.add(d.client)
            return Flight(d.client, r, off, None)
        return Flight(d.client, r, done, res)

    def state_dict(self) -> dict[str, Any]:
        return {"flights": [_saved(f) for f in self.flights]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.flights = [_loaded(f) for f in state["flights"]]


def _saved(f: Flight) -> dict[str, Any]:
    out: dict[str, Any] = {"client": f.client, "version": f.version, "arrives": f.arrives}
    if (res := f.result) is not None:
        out["result"] = {
            "data": torch.frombuffer(bytearray(res.data), dtype=torch.uint8).clone()
            if res.data
            else torch.zeros(0, dtype=torch.uint8),
            "payload_bits": res.payload_bits,
            "num_samples": res.num_samples,
            "train_loss": res.train_loss,
            "compress_s": res.compress_s,
            "failure": res.failure,
            "logs": dict(res.logs),
        }
    return out


def _loaded(f: dict[str, Any]) -> Flight:
    res = None
    if (saved := f.get("result")) is not None:
        res = ClientResult(
            client=int(f["client"]), **saved | {"data": saved["data"].numpy().tobytes()}
        )
    return Flight(int(f["client"]), int(f["version"]), float(f["arrives"]), res)
