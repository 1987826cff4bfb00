"""Simulated communication time: what a round's traffic would take over real client links,
as FedScale and Plato users measure it. Nothing is slowed down; the round's simulated time
(its slowest sampled client) is logged beside its bits."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedbat.seeding import generator

NETWORK = -2  # the "who" part of the seeds of the client links


@dataclass(frozen=True)
class Network:
    """Client links: uplink and downlink bandwidth in Mbit/s and a one-way latency. With
    ``spread`` > 0 each client's bandwidths are the means times ``exp(spread * z)``, z a
    standard normal drawn once from (seed, client): slow and fast devices.

    >>> net = Network(uplink_mbps=1.0, downlink_mbps=10.0, latency_ms=50.0)
    >>> net.client_seconds(0, up_bits=1_000_000, down_bits=10_000_000)  # 2 x 50 ms + 1 s + 1 s
    2.1
    """

    uplink_mbps: float
    downlink_mbps: float
    latency_ms: float = 0.0
    spread: float = 0.0
    seed: int = 0

    def bandwidths(self, client: int) -> tuple[float, float]:
        """(uplink, downlink) of ``client`` in bit/s."""
        up, down = self.uplink_mbps * 1e6, self.downlink_mbps * 1e6
        if self.spread == 0:
            return up, down
        z = torch.randn(2, generator=generator(self.seed, NETWORK, client), dtype=torch.float64)
        return up * math.exp(self.spread * float(z[0])), down * math.exp(self.spread * float(z[1]))

    def client_seconds(self, client: int, up_bits: int, down_bits: int) -> float:
        """Receive the model, send the update: two latencies and two transfers."""
        up, down = self.bandwidths(client)
        return 2 * self.latency_ms / 1e3 + down_bits / down + up_bits / up

    def round_seconds(self, up_bits: dict[int, int], down_bits: dict[int, int]) -> float:
        """The round's communication time: its slowest sampled client's (a client that sent
        nothing back still had to receive)."""
        return max(self.client_seconds(c, up_bits.get(c, 0), b) for c, b in down_bits.items())
