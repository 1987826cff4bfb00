"""What each sampled client is sent on the downlink, and its bits.

A client holds the model of the last round it took part in, not the server's latest: the
broadcasts of the rounds it sat out never reached it. At the start of a round each sampled
client is sent the broadcasts it missed, oldest first, or the whole model (fp32, the
``none`` packet of ``w_hat``) when that is no larger or it never took part. Either way it
then holds ``w_hat`` exactly, so training is the same; only the bits differ. A real network
(Flower) sends these very packets; the simulation counts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedbat.compressors import Packet, TensorSpec, build, encode_update

FULL = build("none")  # the whole model travels uncompressed


@dataclass(frozen=True)
class Delivery:
    """What one client is sent: the broadcasts of ``rounds`` (0-based), or the full model
    when ``rounds`` is empty."""

    client: int
    rounds: tuple[int, ...]
    bits: int
    payload_bits: int

    @property
    def full(self) -> bool:
        return not self.rounds


class Downlink:
    """Per client, the ``w_hat`` version it holds (rounds completed, -1: none); and the
    latest broadcasts, as many as are together smaller than the full model (an older chain
    never wins), so memory stays under one model whatever the population.

    >>> import torch
    >>> plan = [TensorSpec("w", torch.Size([1000]), torch.float32, True)]
    >>> link = Downlink(3, encode_full({"w": torch.zeros(1000)}, plan))
    >>> link.full.bits > 32_000, [d.full for d in link.deliver([0, 1], 0)]
    (True, [True, True])
    >>> link.record(0, Packet(b"x" * 500, 3200))
    >>> link.record(1, Packet(b"y" * 600, 4000))
    >>> [(d.rounds, d.bits) for d in link.deliver([0, 2], 2)]  # 0 missed 2, 2 never came
    [((0, 1), 8800), ((), 33728)]
    """

    def __init__(self, num_clients: int, full: Packet) -> None:
        self.version = torch.full((num_clients,), -1, dtype=torch.int32)
        self.recent: dict[int, Packet] = {}  # round -> its broadcast
        self.full = full  # only its size matters here: every full packet has the same

    def deliver(self, clients: list[int], round_idx: int) -> list[Delivery]:
        """What each of ``clients`` is sent at the start of ``round_idx``; they then hold
        ``w_hat`` as of that round."""
        out = []
        for c in clients:
            v = int(self.version[c])
            chain = tuple(range(v, round_idx)) if v >= 0 else None
            if chain is not None and all(j in self.recent for j in chain):
                bits = sum(self.recent[j].bits for j in chain)
                if bits < self.full.bits:
                    payload = sum(self.recent[j].payload_bits for j in chain)
                    out.append(Delivery(c, chain, bits, payload))
                    continue
            out.append(Delivery(c, (), self.full.bits, self.full.payload_bits))
        for c in clients:
            self.version[c] = round_idx
        return out

    def record(self, round_idx: int, packet: Packet) -> None:
        """Keep round ``round_idx``'s broadcast; drop the ones no chain can use any more."""
        self.recent[round_idx] = packet
        total = sum(p.bits for p in self.recent.values())
        for j in sorted(self.recent):
            if total < self.full.bits:
                break
            total -= self.recent.pop(j).bits

    def state_dict(self) -> dict:
        return {
            "version": self.version.clone(),
            "recent": {
                str(j): torch.frombuffer(bytearray(p.data), dtype=torch.uint8)
                for j, p in self.recent.items()
            },
            "recent_payload_bits": {str(j): p.payload_bits for j, p in self.recent.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        version = state["version"]
        if version.shape != self.version.shape:
            raise ValueError(f"downlink state for {version.numel()} clients")
        self.version = version.to(torch.int32).clone()
        self.recent = {
            int(j): Packet(t.numpy().tobytes(), int(state["recent_payload_bits"][j]))
            for j, t in state["recent"].items()
        }


def apply_broadcast(
    held: dict[str, torch.Tensor], decoded: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The weights a client holds after one broadcast (which leaves frozen tensors out):
    the server and every client apply it with these very operations, so they hold the same
    bits."""
    return {k: held[k] + decoded[k].to(held[k].dtype) if k in decoded else held[k] for k in held}


def encode_full(state: dict[str, torch.Tensor], plan: list[TensorSpec]) -> Packet:
    """The whole of ``state`` as a packet (``none``): what a client without a usable chain
    is sent; decoding it gives the state itself."""
    return encode_update(state, plan, FULL, torch.Generator())
