"""The server: aggregation of decoded client updates and the downlink broadcast
(docs/architecture.md, "One round", steps 6-7). Every rank runs it identically, so all
ranks hold the same model."""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from fedbat.client import ClientResult
from fedbat.compressors import (
    Compressor,
    Memory,
    Packet,
    TensorSpec,
    decode_update,
    encode_update,
)
from fedbat.compressors.base import all_finite
from fedbat.compressors.plan import frozen_specs
from fedbat.compressors.update import SharedSeed
from fedbat.downlink import apply_broadcast
from fedbat.errors import PacketError
from fedbat.intake import Candidate, Checked, Invalid, Reader, norm
from fedbat.seeding import DOWNLINK, generator
from fedbat.strategies import Strategy
from fedbat.strategies import build as build_strategy


@dataclass
class Aggregate:
    """The outcome of one round's aggregation."""

    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    train_loss: float = float("nan")
    stats: dict[str, float] = field(default_factory=dict)
    logs: dict[str, float] = field(default_factory=dict)  # self.log of training_step


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """How the server seeds its downlink draws and weighs and bounds client updates."""

    seed: int = 0
    max_update_ratio: float | None = 1000.0  # an update this many times the model's: rejected
    weight_batch_size: int | None = None  # set: weigh clients by batches, not samples
    num_clients: int = 1


class Server:
    """Holds the global model, the weights the clients hold (``w_hat``), the strategy (the
    server rule and its state) and the downlink error-feedback residual."""

    def __init__(
        self,
        task: nn.Module,
        plan: list[TensorSpec],
        uplink: Compressor,
        downlink: Compressor,
        strategy: Strategy | None = None,
        settings: ServerSettings = ServerSettings(),
    ) -> None:
        self.model = copy.deepcopy(task).cpu().requires_grad_(False)
        travel = {s.name for s in plan}  # what the strategy moves: frozen tensors never move
        self.params = {n: p for n, p in self.model.named_parameters() if n in travel}
        self.plan, self.uplink, self.downlink, self.seed = plan, uplink, downlink, settings.seed
        self.max_update_ratio = settings.max_update_ratio
        self.weight_batch_size = settings.weight_batch_size
        self.strategy = strategy if strategy is not None else build_strategy("fedavg")
        self.strategy.setup(self.params, settings.num_clients)
        self.packet_plan = plan + self.strategy.extra_plan(plan)  # both directions
        self.full_plan = self.packet_plan + frozen_specs(self.model, plan)  # the whole model
        # what a client's training hook encodes: checked against what honest training gives
        self.learned = frozenset(s.name for s in plan if s.compressed and uplink.learns)
        self.held = self.global_state()
        self.held_extra = self.strategy.broadcast_state()  # the strategy's, as clients hold it
        self.previous = self.held | self.held_extra  # as of the last broadcast
        self.memory = Memory() if downlink.remembers else None

    def global_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def set_buffers(self, values: Mapping[str, torch.Tensor]) -> None:
        """Replace some of the global model's buffers (BatchNorm statistics the server
        re-estimated); the next broadcast carries the change."""
        buffers = dict(self.model.named_buffers())
        for name, value in values.items():
            buffers[name].copy_(value)

    def aggregate(
        self,
        results: list[ClientResult],
        sampled: Collection[int],
        round_idx: int = 0,
        versions: Mapping[int, int] | None = None,
    ) -> Aggregate:
        """Apply the strategy's combination of the valid packets of round ``round_idx``, in
        client-id order, each read (decoded, checked) as the combination reads it
        (``fedbat/intake.py``). ``versions``: the round each client trained in, when older
        (buffered rounds): its shared randomness is that round's, its staleness the difference.

        Only the round's ``sampled`` clients count, each at most once: a result for another
        client, or several for one (a replay), is rejected, all of that client's."""
        versions = versions or {}
        out = Aggregate()
        candidates = []
        count = Counter(res.client for res in results)
        for res in sorted(results, key=lambda r: r.client):
            if res.client not in sampled:
                out.rejected[res.client] = "not sampled in this round"
            elif count[res.client] > 1:
                out.rejected[res.client] = f"{count[res.client]} results in one round (a replay)"
            elif not res.ok:
                out.rejected[res.client] = res.failure
            else:
                trained_in = versions.get(res.client, round_idx)
                weight = self.strategy.weight(self.weight(res.num_samples), round_idx - trained_in)
                shared = SharedSeed(self.seed, trained_in, res.client)
                candidates.append(Candidate(res.client, res.data, shared, weight, res.train_loss))
        if not candidates:
            return out
        before = self.global_state(), copy.deepcopy(self.strategy.state_dict())
        reader = Reader(self.packet_plan, self.uplink, self.learned, self._update_norm_bound())
        mean, checked = self._combine(candidates, reader, out.rejected, before[1])
        valid = checked.candidates
        if not valid:
            return out
        out.accepted = [c.client for c in valid]
        total = float(sum(c.weight for c in valid))
        out.train_loss = sum(c.weight * c.train_loss for c in valid) / total
        for i in range(len(valid)):
            for k, v in checked.stats[i].items():
                out.stats[k] = out.stats.get(k, 0.0) + v
        out.stats = {k: v / len(valid) for k, v in out.stats.items()}
        out.logs = _weighted_logs([r for r in results if r.client in out.accepted])
        self._apply(mean)
        out.logs |= self.strategy.metrics()
        after = [*self.model.state_dict().values(), *_tensors(self.strategy.state_dict())]
        if not all(all_finite(v.float()) for v in after):
            # the global model and the strategy's state (momentum, moments) stay finite
            self.model.load_state_dict(before[0])
            self.strategy.load_state_dict(before[1])
            out.rejected |= dict.fromkeys(out.accepted, "the aggregate overflowed")
            out.accepted = []
        return out

    def _combine(
        self, candidates: list[Candidate], reader: Reader, rejected: dict[int, str], state: dict
    ) -> tuple[dict[str, torch.Tensor], Checked]:
        """The strategy's combination of the candidates, read once each as it goes; when one
        is invalid, its state back to ``state``, every candidate checked, and the
        combination again over the valid ones (with their weights)."""
        checked = Checked(candidates, reader)
        try:
            mean = self.strategy.combine(checked, [c.weight for c in candidates])
            checked.read_the_rest()
            return mean, checked
        except Invalid:
            self.strategy.load_state_dict(copy.deepcopy(state))
        valid = []
        for c in candidates:
            try:
                reader.read(c)
                valid.append(c)
            except PacketError as err:
                rejected[c.client] = str(err)
        checked = Checked(valid, reader)
        if not valid:
            return {}, checked
        mean = self.strategy.combine(checked, [c.weight for c in valid])
        checked.read_the_rest()  # the stats of those the rule did not read
        return mean, checked

    def weight(self, num_samples: int) -> int:
        """A client's aggregation weight: its samples, or (the FedBAT authors' choice) its
        batches per epoch."""
        b = self.weight_batch_size
        return num_samples if b is None else -(-num_samples // b)

    def _update_norm_bound(self) -> float:
        """``max_update_ratio`` x the global model's L2 norm (at least 1): a larger client
        update is no training step but an attack or a fault, and is rejected alone."""
        if self.max_update_ratio is None:
            return math.inf
        floats = [v for v in self.model.state_dict().values() if v.is_floating_point()]
        return self.max_update_ratio * max(norm(floats), 1.0)

    @torch.no_grad()
    def _apply(self, mean: dict[str, torch.Tensor]) -> None:
        """The strategy moves the parameters by the mean update; buffers (BN statistics,
        counters) take the mean update directly."""
        self.strategy.apply(mean)
        for name, buf in self.model.named_buffers():
            if name in mean:
                delta = mean[name]
                buf += delta.round().to(buf.dtype) if not buf.is_floating_point() else delta

    def broadcast(self, round_idx: int) -> Packet:
        """Encode the round's server update with the downlink compressor; ``w_hat`` advances
        by what the clients decode (exactly the global model when the downlink is lossless).

        With error feedback the residual carried to the next broadcast is what compression
        dropped, so ``w_hat`` tracks the global model; without it ``w_hat`` drifts away.
        """
        state = self.global_state() | self.strategy.broadcast_state()
        delta = {s.name: state[s.name] - self.previous[s.name] for s in self.packet_plan}
        self.previous = state
        gen = generator(self.seed, round_idx, DOWNLINK)
        plan = self.packet_plan
        shared = SharedSeed(self.seed, round_idx)
        packet = encode_update(delta, plan, self.downlink, gen, self.memory, "server", shared)
        held = self.held | self.held_extra
        if self.downlink.lossless:
            held = state
        else:
            decoded, _ = decode_update(packet.data, plan, self.downlink, shared=shared)
            held = apply_broadcast(held, decoded)
        self.held = {k: held[k] for k in self.held}
        self.held_extra = {k: held[k] for k in self.held_extra}
        return packet

    def state_dict(self) -> dict:
        return {
            "global": self.global_state(),
            "held": self.held,
            "held_extra": self.held_extra,
            "previous": self.previous,
            "strategy": self.strategy.state_dict(),
            "memory": dict(self.memory.residuals) if self.memory is not None else {},
            "compressor": dict(self.memory.states) if self.memory is not None else {},
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["global"])
        self.held = state["held"]
        self.held_extra = state.get("held_extra", {})
        self.previous = state["previous"]
        self.strategy.load_state_dict(state["strategy"])
        if self.memory is not None:
            self.memory = Memory(state["memory"], state.get("compressor", {}))


def _tensors(state: object) -> list[torch.Tensor]:
    """Every tensor of a (nested) state dict."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, list | tuple):
        return [t for v in state for t in _tensors(v)]
    return []


def _weighted_logs(results: list[ClientResult]) -> dict[str, float]:
    """Each logged name's mean over the clients that logged it, weighted by their samples."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for res in results:
        for k, v in res.logs.items():
            sums[k] = sums.get(k, 0.0) + v * res.num_samples
            weights[k] = weights.get(k, 0.0) + res.num_samples
    return {k: sums[k] / weights[k] for k in sorted(sums)}
