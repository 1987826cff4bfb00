"""One federation: what a run holds between rounds, and one round as docs/architecture.md
("One round") describes it. Every process runs the same deterministic server logic; rank r
trains its share of the sampled clients. With one process this is plain sequential
simulation."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

from omegaconf import OmegaConf

from fedbat import checkpoint
from fedbat.accounting import BitCounter
from fedbat.assembly import Components
from fedbat.batchnorm import batch_statistics, proxy_batches, recompute, statistics_names
from fedbat.buffered import Buffered
from fedbat.client import ClientJob, ClientResult, input_conversion, train_client
from fedbat.clientstate import ClientState
from fedbat.clientstore import ClientStore
from fedbat.compressors.plan import load_model
from fedbat.contract import evaluate, evaluation_plan
from fedbat.devices import Clock, build_devices, clock_enabled
from fedbat.downlink import Delivery, Downlink, encode_full
from fedbat.errors import ConfigError
from fedbat.network import Network
from fedbat.seeding import sample_clients
from fedbat.transport import InJob, RoundContext, Transport

# a round's clients, what they were sent, the results it aggregates, the round each of those
# trained in (buffered rounds), and its clock metrics
Collected = tuple[list[int], list[Delivery], list[ClientResult], dict[int, int], dict[str, float]]


class Federation:
    """What a run holds between rounds, and one round (docs/architecture.md, "One round",
    steps 1-8)."""

    def __init__(self, parts: Components, transport: Transport | None = None) -> None:
        cfg, f = parts.cfg, parts.cfg.fed
        self.parts, self.cfg, self.fabric = parts, cfg, parts.fabric
        self.transport = transport if transport is not None else InJob()
        self.dm, self.task, self.plan, self.local = parts.data, parts.task, parts.plan, parts.local
        self.schedule, self.uplink = parts.schedule, parts.uplink
        if self.dm.num_clients < f.clients_per_round:
            raise ConfigError(
                f"fed.clients_per_round={f.clients_per_round}: the data has only "
                f"{self.dm.num_clients} clients"
            )
        self.server = parts.server()
        held = self.server.held | self.server.held_extra
        self.downlink = Downlink(self.dm.num_clients, encode_full(held, self.server.full_plan))
        self.store = ClientStore(cfg.run_dir, self.dm.num_clients, parts.state_template())
        self.bits = BitCounter()
        n = cfg.get("network") or {}
        self.network = (
            Network(n.uplink_mbps, n.downlink_mbps, n.latency_ms, n.spread, cfg.seed)
            if n.get("uplink_mbps") is not None
            else None
        )
        self.comm_s = 0.0  # cumulative simulated communication time
        self.clock: Clock | None = None
        if clock_enabled(cfg):
            s = cfg.system
            devices = build_devices(cfg, self.dm.num_clients)
            self.clock = Clock(devices, s.deadline_s, float(s.over_select))
        self.buffered: Buffered | None = None
        if self.server.strategy.asynchronous and self.clock is not None:
            size = int(cfg.strategy.buffer_size)
            self.buffered = Buffered(self.clock, cfg.fed.clients_per_round, size, cfg.seed)
        self.resets = 0  # the round's clients whose stored state was damaged
        self.history: list[dict[str, float]] = []
        self.monitor = str(cfg.get("monitor", "auto"))  # 'auto': resolved at the first evaluation
        self.bn_stats = str(f.get("bn_stats", "average"))

    def play_round(self, r: int) -> dict[str, float]:
        """Sample, send each client what it missed, train, aggregate, broadcast, count."""
        t0 = time.perf_counter()
        self.resets = 0
        play = self._synchronous if self.buffered is None else self._buffered
        clients, sent_down, results, versions, timed = play(r)
        t_trained = time.perf_counter()
        agg = self.server.aggregate(results, clients, r, versions)
        if self.bn_stats == "recompute":  # before the broadcast, which carries them
            self._recompute_statistics()
        lr = self.schedule.lr
        self.schedule.end_round(
            max((self.local.steps(self.dm.client_size(c)) for c in clients), default=0)
        )
        t_down = time.perf_counter()
        broadcast = self.server.broadcast(r)
        self.downlink.record(r, broadcast)
        compress_s = sum(res.compress_s for res in results) + time.perf_counter() - t_down
        for client, why in agg.rejected.items():
            self.fabric.print(f"round {r + 1}: rejected client {client}: {why}")
        metrics: dict[str, float] = {"round": r + 1, "train/loss": agg.train_loss}
        metrics |= self.bits.add_round(results, sent_down, self.plan)
        if self.network is not None:
            up = {res.client: 8 * len(res.data) for res in results}
            down = {d.client: d.bits for d in sent_down}
            comm = self.network.round_seconds(up, down)
            self.comm_s += comm
            metrics |= {"sim/comm_s": comm, "sim/comm_cum_s": self.comm_s}
        return (
            metrics
            | {
                "time/round_s": time.perf_counter() - t0,
                "time/train_s": t_trained - t0,  # the clients, and the exchange of results
                "time/server_s": time.perf_counter() - t_trained,  # aggregate to broadcast
                "time/compress_s": compress_s,
                "clients/accepted": len(agg.accepted),
                "clients/rejected": len(agg.rejected),
                "clients/state_reset": self.resets,
            }
            | timed
            | {f"fedbat/{k}": v for k, v in agg.stats.items()}
            | agg.logs
            | self.transport.round_metrics()
            | ({"train/lr": lr} if lr is not None else {})
        )

    def _train(self, r: int, deliveries: list[Delivery]) -> list[ClientResult]:
        """Train the clients of ``deliveries`` through the transport; clients it lost and
        damaged stored states are dealt with here."""
        trained = self.transport.train(self._context(r, deliveries))
        for client in trained.lost:  # what it holds is unknown now: the full model next time
            self.downlink.version[client] = -1
        resets = {res.client: res.reset for res in trained.results if res.reset}
        self.store.forget(list(resets))
        self.store.advance([res.client for res in trained.results if res.stored], r)
        for client, why in resets.items():
            self.fabric.print(f"round {r + 1}: client {client}: state reset, {why}")
        self.resets += len(resets)
        return trained.results

    def _synchronous(self, r: int) -> Collected:
        """The round's clients, all at once; on the clock, its round policy decides whose
        updates count (a late or dropped client's is not aggregated)."""
        cfg, per_round = self.cfg, self.cfg.fed.clients_per_round
        if self.clock is None:
            clients = sample_clients(cfg.seed, r, self.dm.num_clients, per_round)
            sent_down = self.downlink.deliver(clients, r)
            return clients, sent_down, self._train(r, sent_down), {}, {}
        start, clients = self.clock.sample(cfg.seed, r, per_round)
        sent_down = self.downlink.deliver(clients, r)
        line = self.clock.begin(
            start, {d.client: d.bits for d in sent_down}, {c: self._samples(c) for c in clients}
        )
        results = self._train(r, [d for d in sent_down if d.client in line.computed])
        for client in line.unknown:
            self.downlink.version[client] = -1
        before = self.clock.now
        out = self.clock.end(line, {res.client: 8 * len(res.data) for res in results}, per_round)
        results = [res for res in results if res.client in out.kept or not res.ok]
        timed = {
            "sim/round_s": out.end - before,
            "sim/clock_s": out.end,
            "clients/dropped": out.dropped,
            "clients/late": out.late,
        }
        return clients, sent_down, results, {}, timed

    def _buffered(self, r: int) -> Collected:
        """FedBuff's round: the first ``buffer_size`` arrivals of clients that started when a
        slot was free (``fedbat/buffered.py``), each from the model it was sent."""
        assert self.buffered is not None and self.clock is not None
        before = self.clock.now
        rnd = self.buffered.play(
            r, lambda cs: self.downlink.deliver(cs, r), lambda ds: self._train(r, ds), self._samples
        )
        for client in rnd.unknown:
            self.downlink.version[client] = -1
        versions = {f.client: f.version for f in rnd.arrived}
        stale = [r - v for v in versions.values()] or [0]
        timed = {
            "sim/round_s": self.clock.now - before,
            "sim/clock_s": self.clock.now,
            "clients/dropped": rnd.dropped,
            "clients/started": len(rnd.deliveries),
            "fedbuff/staleness_mean": sum(stale) / len(stale),
            "fedbuff/staleness_max": max(stale),
        }
        results = [f.result for f in rnd.arrived if f.result is not None]
        return sorted(versions), rnd.deliveries, results, versions, timed

    def _samples(self, client: int) -> int:
        """The samples ``client`` trains on in a round: local epochs x its data."""
        return self.local.epochs * self.dm.client_size(client)

    def stop_reason(self) -> str:
        """Why the run stops before its next round ('' to go on): the strategy's (a privacy
        budget), or no client ever online again."""
        if why := self.server.strategy.stop_reason():
            return why
        if self.clock is not None and self.clock.first_online() is None:
            return (
                f"fedbat: stopping: no client is online at or after virtual time "
                f"{self.clock.now:.1f} s (system.availability)"
            )
        return ""

    def _context(self, r: int, sent_down: list[Delivery]) -> RoundContext:
        held = self.server.held | self.server.held_extra
        return RoundContext(
            index=r,
            deliveries=sent_down,
            num_clients=self.dm.num_clients,
            client_size=self.dm.client_size,
            full_model=lambda: encode_full(held, self.server.full_plan).data,
            chain_packet=lambda j: self.downlink.recent[j].data,
            schedule=self.schedule,
            train_local=lambda client: self.train_client(client, r),
            fabric=self.fabric,
        )

    def train_client(self, client: int, r: int) -> ClientResult:
        """Train ``client`` in this process from the weights it holds (``w_hat``) and its
        own state, which it writes back to the store: results travel without it."""
        job = ClientJob(
            client=client,
            round=r,
            held=self.server.held,
            extra=self.server.held_extra,
            state=ClientState.from_flat(self.store.get(client)),
        )
        res = train_client(self.parts.setup, job)
        if res.ok and res.state:
            self.store.put(client, r, res.state.flat())
            res.stored = True
        res.state = ClientState()
        res.reset = self.store.take_resets().get(client, "")
        return res

    def _recompute_statistics(self) -> None:
        """``fed.bn_stats=recompute`` (``fedbat/batchnorm.py``), identically on every rank."""
        f, convert = self.cfg.fed, input_conversion(self.fabric)
        batches = proxy_batches(self.dm, f.bn_clients, f.batch_size, self.cfg.seed, self.fabric)
        load_model(self.task, self.server.global_state())
        recompute(self.task, map(convert, batches))
        names = statistics_names(self.task)
        self.server.set_buffers({k: v for k, v in self.task.state_dict().items() if k in names})

    def evaluate(self) -> dict[str, float]:
        """The global model's validation then test metrics; ``monitor=auto`` becomes the
        first key its validation logged, else its first test key."""
        self.task.load_state_dict(self.server.global_state())
        device = self.fabric.device
        val = getattr(self.dm, "val_batches", None)
        out: dict[str, float] = {}
        plan = evaluation_plan(
            self.task, val(1024, device) if val else None, self.dm.test_batches(1024, device)
        )
        convert = input_conversion(self.fabric)
        local = self.bn_stats == "local"  # the server holds no statistics: each batch's own
        for stage, batches in plan:
            with batch_statistics(self.task) if local else nullcontext():
                logged = evaluate(self.task, stage, map(convert, batches))
            if self.monitor == "auto" and logged:
                self.monitor = next(iter(logged))
            out |= logged
        return out

    def state_dict(self, completed: int, wandb_id: str | None) -> dict[str, Any]:
        return {
            "format": checkpoint.FORMAT,
            "round": completed,
            "server": self.server.state_dict(),
            "clients": self.store.state_dict(),
            "downlink": self.downlink.state_dict(),
            "bits": self.bits.state_dict(),
            "schedule": self.schedule.state_dict(),
            "buffered": self.buffered.state_dict() if self.buffered is not None else {},
            "history": self.history,
            "monitor": self.monitor,
            "wandb_id": wandb_id or "",
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state, legacy = checkpoint.migrate(state, self.dm.num_clients)
        self.server.load_state_dict(state["server"])
        self.store.load_state_dict(state["clients"])
        for client, tensors in legacy.items():  # an older format's, into the store
            self.store.put(client, state["round"] - 1, tensors)
        self.store.advance(list(legacy), state["round"] - 1)
        self.downlink.load_state_dict(state["downlink"])
        if not self.transport.clients_persist:
            self.downlink.version.fill_(-1)
        self.bits = BitCounter(**state["bits"])
        self.schedule.load_state_dict(state["schedule"])
        if self.buffered is not None:
            self.buffered.load_state_dict(state["buffered"])
        self.history = state["history"]
        if self.monitor == "auto":
            self.monitor = state["monitor"]
        last = self.history[-1] if self.history else {}
        self.comm_s = last.get("sim/comm_cum_s", 0.0)
        if self.clock is not None:
            self.clock.now = last.get("sim/clock_s", 0.0)
