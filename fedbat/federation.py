"""One federation: what a run holds between rounds, and one round as docs/architecture.md
("One round") describes it. Every process runs the same deterministic server logic; rank r
trains its share of the sampled clients. With one process this is plain sequential
simulation."""

from __future__ import annotations

import copy
import time
from typing import Any

import lightning as L
import torch
from lightning.fabric import Fabric
from omegaconf import DictConfig, OmegaConf

from fedbat import exchange
from fedbat.accounting import BitCounter
from fedbat.assembly import build_datamodule, build_plan, build_task, place
from fedbat.client import (
    ClientData,
    ClientJob,
    ClientResult,
    ClientSetup,
    LocalTraining,
    input_conversion,
    train_client,
)
from fedbat.clientstore import ClientStore
from fedbat.compressors import ErrorFeedback, build_pair
from fedbat.contract import ServerSchedule, evaluate, evaluation_plan
from fedbat.downlink import Downlink, encode_full
from fedbat.errors import ConfigError
from fedbat.network import Network
from fedbat.seeding import sample_clients
from fedbat.server import Server
from fedbat.strategies import build as build_strategy
from fedbat.transport import InJob, Transport


class Federation:
    """What a run holds between rounds, and one round (docs/architecture.md, "One round",
    steps 1-8)."""

    def __init__(
        self,
        cfg: DictConfig,
        fabric: Fabric,
        task: L.LightningModule | None = None,
        data: ClientData | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.cfg, self.fabric, f = cfg, fabric, cfg.fed
        self.transport = transport if transport is not None else InJob()
        self.dm = data if data is not None else build_datamodule(cfg)
        if self.dm.num_clients < f.clients_per_round:
            raise ConfigError(
                f"fed.clients_per_round={f.clients_per_round}: the data has only "
                f"{self.dm.num_clients} clients"
            )
        self.task = task if task is not None else build_task(cfg, self.dm)
        if fabric.world_size > 1:  # a module built by the user's script: rank 0's weights
            self.task.load_state_dict(fabric.broadcast(self.task.state_dict(), src=0))
        self.task = place(self.task, fabric)
        self.schedule = ServerSchedule(copy.deepcopy(self.task))  # checks the contract too
        self.plan = build_plan(cfg, self.task, self.dm, input_conversion(fabric))
        self.uplink, downlink = build_pair(OmegaConf.to_container(cfg.compressor, resolve=True))
        self.server = Server(
            self.task,
            self.plan,
            self.uplink,
            downlink,
            strategy=build_strategy(OmegaConf.to_container(cfg.strategy, resolve=True)),
            seed=cfg.seed,
            max_update_ratio=f.max_update_ratio,
            weight_batch_size=f.batch_size if f.weight_by == "batches" else None,
            num_clients=self.dm.num_clients,
        )
        held = self.server.held | self.server.held_extra
        self.downlink = Downlink(self.dm.num_clients, encode_full(held, self.server.full_plan))
        self.error_feedback = self.uplink.needs_memory
        self.store = ClientStore(cfg.run_dir, self.dm.num_clients, self._state_template())
        self.bits = BitCounter()
        n = cfg.get("network") or {}
        self.network = (
            Network(n.uplink_mbps, n.downlink_mbps, n.latency_ms, n.spread, cfg.seed)
            if n.get("uplink_mbps") is not None
            else None
        )
        self.comm_s = 0.0  # cumulative simulated communication time
        self.history: list[dict[str, float]] = []
        self.monitor = str(cfg.get("monitor", "auto"))  # 'auto': resolved at the first evaluation
        self.local = LocalTraining(f.local_epochs, f.batch_size, cfg.seed, fabric.device, fabric)
        self.setup = ClientSetup(
            task=self.task,
            data=self.dm,
            local=self.local,
            plan=self.plan,
            uplink=self.uplink,
            schedule=self.schedule,
            strategy=self.server.strategy,
        )

    def _state_template(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """What a client's stored state may hold: its residuals (one fp32 tensor per
        compressed tensor of its packets) and the strategy's client state."""
        residuals = [s for s in self.server.packet_plan if s.compressed and self.error_feedback]
        out = {f"residual/{s.name}": (s.shape, torch.float32) for s in residuals}
        states = self.server.strategy.client_state_plan(self.plan)
        return out | {f"state/{s.name}": (s.shape, s.dtype) for s in states}

    def play_round(self, r: int) -> dict[str, float]:
        """Sample, send each client what it missed, train, aggregate, broadcast, count."""
        cfg, t0 = self.cfg, time.perf_counter()
        clients = sample_clients(cfg.seed, r, self.dm.num_clients, cfg.fed.clients_per_round)
        sent_down = self.downlink.deliver(clients, r)
        results = self.transport.train(self, sent_down, r)
        t_trained = time.perf_counter()
        resets = {res.client: res.reset for res in results if res.reset}
        self.store.forget(list(resets))
        self.store.advance([res.client for res in results if res.stored], r)
        for client, why in resets.items():
            self.fabric.print(f"round {r + 1}: client {client}: state reset, {why}")
        agg = self.server.aggregate(results, clients)
        lr = self.schedule.lr
        self.schedule.end_round(max(self.local.steps(self.dm.client_size(c)) for c in clients))
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
                "clients/state_reset": len(resets),
            }
            | {f"fedbat/{k}": v for k, v in agg.stats.items()}
            | agg.logs
            | self.transport.round_metrics()
            | ({"train/lr": lr} if lr is not None else {})
        )

    def train_client(self, client: int, r: int) -> ClientResult:
        """Train ``client`` in this process from the weights it holds (``w_hat``) and its
        own state, which it writes back to the store: results travel without it."""
        kept = self.store.get(client)
        residuals = {f"{client}/{k}": v for k, v in exchange.under(kept, "residual/").items()}
        job = ClientJob(
            client=client,
            round=r,
            held=self.server.held,
            extra=self.server.held_extra,
            state=exchange.under(kept, "state/"),
            memory=ErrorFeedback(residuals) if self.error_feedback else None,
        )
        res = train_client(self.setup, job)
        mine = {f"residual/{k.split('/', 1)[1]}": v for k, v in res.residuals.items()}
        mine |= {f"state/{k}": v for k, v in res.state.items()}
        if res.ok and mine:
            self.store.put(client, r, mine)
            res.stored = True
        res.residuals, res.state = {}, {}
        res.reset = self.store.take_resets().get(client, "")
        return res

    def _migrate(
        self, r: int, residuals: dict[str, torch.Tensor], states: dict[str, torch.Tensor]
    ) -> None:
        by_client: dict[int, dict[str, torch.Tensor]] = {}
        for part, flat in (("residual", residuals), ("state", states)):
            for key, v in flat.items():
                client, _, name = key.partition("/")
                by_client.setdefault(int(client), {})[f"{part}/{name}"] = v
        for client, tensors in by_client.items():
            self.store.put(client, r, tensors)
        self.store.advance(list(by_client), r)

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
        for stage, batches in plan:
            logged = evaluate(self.task, stage, map(convert, batches))
            if self.monitor == "auto" and logged:
                self.monitor = next(iter(logged))
            out |= logged
        return out

    def state_dict(self, completed: int, wandb_id: str | None) -> dict[str, Any]:
        return {
            "round": completed,
            "server": self.server.state_dict(),
            "clients": self.store.state_dict(),
            "downlink": self.downlink.state_dict(),
            "bits": self.bits.state_dict(),
            "schedule": self.schedule.state_dict(),
            "history": self.history,
            "monitor": self.monitor,
            "wandb_id": wandb_id or "",
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.server.load_state_dict(state["server"])
        if "clients" in state:
            self.store.load_state_dict(state["clients"])
        else:  # a checkpoint from before the store: its states move into the store
            self._migrate(state["round"] - 1, state["uplink_memory"], state["client_states"])
        if "downlink" in state:  # older checkpoints: every client is sent the full model
            self.downlink.load_state_dict(state["downlink"])
        if not self.transport.clients_persist:
            self.downlink.version.fill_(-1)
        self.bits = BitCounter(**state["bits"])
        self.schedule.load_state_dict(state.get("schedule", {}))
        self.history = state["history"]
        if self.monitor == "auto":
            self.monitor = state.get("monitor", "auto")
        self.comm_s = self.history[-1].get("sim/comm_cum_s", 0.0) if self.history else 0.0
