"""Simulated devices on one virtual clock: each client's compute speed, links and
availability, and the round policies (wait for all, a deadline, over-selection) that decide
whom a round waits for. Nothing is slowed down: a client's round time is computed from the
bytes it was really sent and really sent back and the samples it really trained on, and the
clock (``sim/clock_s``) is logged beside the bits.

A client's round, from the moment it is contacted: one latency and its downlink packets at
its downlink bandwidth; ``compute_s_per_sample`` x local epochs x its samples; one latency
and its uplink packet at its uplink bandwidth. It drops out when it goes offline before the
end (the server notices then); it is late when it would finish after ``deadline_s`` or after
the first K of an over-selected round.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from fedbat.network import Network
from fedbat.seeding import generator, sample_from
from fedbat.traces import Profile, read_availability, read_trace

DEVICES = -3  # the "who" part of the seeds of the drawn compute speeds


class Devices:
    """Every client's profile (``profile(client)``, drawn on first use) and its online
    intervals (a client without any: always online)."""

    def __init__(
        self,
        num_clients: int,
        profile: Callable[[int], Profile],
        intervals: dict[int, list[tuple[float, float]]] | None = None,
    ) -> None:
        self.num_clients, self.intervals = num_clients, intervals or {}
        self.profile = functools.lru_cache(maxsize=1 << 16)(profile)

    def offline_at(self, client: int, t: float) -> float | None:
        """When ``client``, online at ``t``, next goes offline (inf: it stays); None when it is
        offline at ``t``. An interval holds its start, not its end."""
        spans = self.intervals.get(client)
        if spans is None:
            return math.inf
        return next((end for start, end in spans if start <= t < end), None)

    def online(self, t: float) -> Sequence[int]:
        """The clients online at ``t``, in id order."""
        if not self.intervals:
            return range(self.num_clients)
        return [c for c in range(self.num_clients) if self.offline_at(c, t) is not None]

    def next_start(self, t: float) -> float | None:
        """The earliest moment after ``t`` at which some offline client comes online."""
        starts = [s for spans in self.intervals.values() for s, _ in spans if s > t]
        return min(starts, default=None)


def clock_enabled(cfg: DictConfig) -> bool:
    """Whether rounds have a time: links (``network.*``), a trace or a compute speed."""
    s, net = cfg.get("system") or {}, cfg.get("network") or {}
    return bool(
        net.get("uplink_mbps") is not None or s.get("trace") or s.get("compute_s_per_sample")
    )


def build_devices(cfg: DictConfig, num_clients: int) -> Devices:
    """The devices of ``system`` (and ``network``): a trace's, else drawn per client from
    (seed, client): compute ``compute_s_per_sample x exp(compute_spread x z)`` and the links
    of :class:`~fedbat.network.Network` (infinitely fast without ``network.*``)."""
    s, net = cfg.get("system") or {}, cfg.get("network") or {}
    avail = s.get("availability")
    intervals = read_availability(Path(str(avail)), num_clients) if avail else {}
    if s.get("trace"):
        return Devices(
            num_clients, read_trace(Path(str(s.trace)), num_clients).__getitem__, intervals
        )
    links = None
    if net.get("uplink_mbps") is not None:
        links = Network(net.uplink_mbps, net.downlink_mbps, net.latency_ms, net.spread, cfg.seed)
    base = float(s.get("compute_s_per_sample") or 0.0)
    spread, seed = float(s.get("compute_spread") or 0.0), int(cfg.seed)

    def draw(c: int) -> Profile:
        up, down = links.bandwidths(c) if links else (math.inf, math.inf)
        z = torch.randn(1, generator=generator(seed, DEVICES, c), dtype=torch.float64)
        compute = base * math.exp(spread * float(z)) if spread else base
        return Profile(compute, up, down, (links.latency_ms if links else 0.0) / 1e3)

    return Devices(num_clients, draw, intervals)


@dataclass
class Timeline:
    """One round on the clock, decided before training: whom to train, who is already gone
    (dropped, or late by the deadline while still computing), whose model is unknown (it
    dropped while downloading), and each trained client's compute end and offline moment."""

    start: float
    gone: dict[int, str]
    unknown: set[int]
    computed: dict[int, float]
    offline: dict[int, float]

    @property
    def train(self) -> list[int]:
        """The clients to train: those whose compute ends online and in time."""
        return list(self.computed)


@dataclass
class Outcome:
    """The round's end on the clock: who counts, who dropped or was late, and when it ended."""

    kept: set[int]
    dropped: int
    late: int
    end: float


class Clock:
    """The virtual time of a run and its round policy: wait for every contacted client, or
    until ``deadline_s``; contact ``ceil(K x over_select)`` and keep the first K to finish."""

    def __init__(
        self, devices: Devices, deadline_s: float | None = None, over_select: float = 1.0
    ) -> None:
        self.devices, self.deadline, self.over_select = devices, deadline_s, over_select
        self.now = 0.0

    def first_online(self) -> float | None:
        """The first moment from now that some client is online (None: never again)."""
        t: float | None = self.now
        while t is not None and not self.devices.online(t):
            t = self.devices.next_start(t)
        return t

    def sample(self, seed: int, r: int, per_round: int) -> tuple[float, list[int]]:
        """The round's start (:meth:`first_online`, which must exist) and its contacted
        clients, sorted: ``ceil(per_round x over_select)`` drawn from those online then (all
        of them when fewer); without availability or over-selection exactly
        :func:`~fedbat.seeding.sample_clients`'s."""
        t = self.first_online()
        assert t is not None, "sample() after first_online() said no client comes online"
        online = self.devices.online(t)
        k = min(len(online), math.ceil(per_round * self.over_select - 1e-9))
        return t, sample_from(online, k, seed, r)

    def begin(
        self, start: float, down_bits: Mapping[int, int], samples: Mapping[int, int]
    ) -> Timeline:
        """Who trains: a client that goes offline before its compute ends, or whose compute
        ends past the deadline, sends nothing and is not trained."""
        cut = start + self.deadline if self.deadline is not None else math.inf
        tl = Timeline(start, {}, set(), {}, {})
        for c, bits in down_bits.items():
            p = self.devices.profile(c)
            received = p.received(start, bits)
            computed = p.computed(received, samples[c])
            off = self.devices.offline_at(c, start)
            tl.offline[c] = off = math.inf if off is None else off
            if min(off, computed) > cut:
                tl.gone[c] = "late"
            elif off < computed:
                tl.gone[c] = "dropped"
                if off < received:
                    tl.unknown.add(c)
            else:
                tl.computed[c] = computed
        return tl

    def end(self, tl: Timeline, up_bits: Mapping[int, int], keep: int) -> Outcome:
        """Whose update counts, given the real uplink bits of the trained clients: those that
        finish uploading online and in time, the first ``keep`` of them in finishing order
        (ties by client id). The round ends when ``keep`` have finished, or else when every
        contacted client has finished, dropped (noticed as it goes offline) or passed the
        deadline. The clock moves to that end."""
        cut = tl.start + self.deadline if self.deadline is not None else math.inf
        waited: list[float] = []  # until when the server waits for each contacted client
        dropped = late = 0
        for c, why in tl.gone.items():
            late, dropped = late + (why == "late"), dropped + (why == "dropped")
            waited.append(cut if why == "late" else tl.offline[c])
        finished: list[tuple[float, int]] = []
        for c in tl.train:
            p, off = self.devices.profile(c), tl.offline[c]
            done = p.uploaded(tl.computed[c], up_bits.get(c, 0))
            if min(off, done) > cut:
                late += 1
                waited.append(cut)
            elif off < done:
                dropped += 1
                waited.append(off)
            else:
                finished.append((done, c))
                waited.append(done)
        finished.sort()
        kept = finished[:keep]
        late += len(finished) - len(kept)
        end = kept[-1][0] if len(kept) == keep else max(waited, default=tl.start)
        self.now = end
        return Outcome({c for _, c in kept}, dropped, late, end)
