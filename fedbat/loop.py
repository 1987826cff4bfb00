"""The federated loop on Lightning Fabric: one round as DESIGN.md describes it.

Every process runs the same deterministic server logic; rank r trains its share of the
sampled clients. With one process this is plain sequential simulation.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from omegaconf import DictConfig, OmegaConf

from compressors import ErrorFeedback, build_pair, wire_plan
from datamodules import FederatedDataModule
from fedbat import checkpoint, exchange
from fedbat.accounting import BitCounter
from fedbat.client import LocalTraining, train_client
from fedbat.config import check_resumable, validate
from fedbat.loggers import build_loggers, close_loggers, is_wandb
from fedbat.models import build as build_model
from fedbat.progress import RoundProgress
from fedbat.seeding import sample_clients
from fedbat.server import Server
from fedbat.task import ClassificationTask


def build_fabric(cfg: DictConfig) -> Fabric:
    t = cfg.trainer
    strategy = t.strategy
    if strategy == "auto" and (t.devices not in (1, "1") or t.num_nodes > 1):
        strategy = "ddp"
    return Fabric(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=t.precision,
    )


def threads_per_process(cfg: DictConfig, fabric: Fabric) -> int:
    """``trainer.threads``, else the cores shared out over this node's processes: CPU
    processes that each spawn one thread per core fight over the cores and crawl."""
    if cfg.trainer.get("threads"):
        return int(cfg.trainer.threads)
    local = max(1, fabric.world_size // max(1, int(cfg.trainer.num_nodes)))
    return max(1, (os.cpu_count() or 1) // local) if local > 1 else torch.get_num_threads()


def build_task(cfg: DictConfig, dm: FederatedDataModule) -> ClassificationTask:
    """The model is initialised from the run seed alone, identically on every rank."""
    torch.manual_seed(cfg.seed)
    params = {k: v for k, v in cfg.model.items() if k != "name"}
    model = build_model(cfg.model.name, dm.input_shape, dm.num_classes, **params)
    f = cfg.fed
    return ClassificationTask(model, dm.num_classes, f.lr, f.momentum, f.weight_decay)


def build_datamodule(cfg: DictConfig) -> FederatedDataModule:
    d = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(d, dict)
    dm = FederatedDataModule(seed=cfg.seed, **d)  # type: ignore[arg-type]
    dm.setup()
    return dm


class Interrupted(KeyboardInterrupt):
    """SIGTERM turned into an exception so that cleanup runs as for Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Interrupted(f"signal {signum}")


class Federation:
    """What a run holds between rounds, and one round (DESIGN.md steps 1-7)."""

    def __init__(self, cfg: DictConfig, fabric: Fabric) -> None:
        self.cfg, self.fabric, f = cfg, fabric, cfg.fed
        self.dm = build_datamodule(cfg)
        self.task = build_task(cfg, self.dm).to(fabric.device)
        self.plan = wire_plan(self.task, cfg.policy.min_numel)
        self.uplink, downlink = build_pair(OmegaConf.to_container(cfg.compressor, resolve=True))
        self.server = Server(
            self.task, self.plan, self.uplink, downlink, f.server_lr, f.server_momentum, cfg.seed
        )
        lossy_ef = self.uplink.error_feedback and not self.uplink.lossless
        self.up_memory = ErrorFeedback() if lossy_ef else None
        self.bits = BitCounter()
        self.history: list[dict[str, float]] = []
        self.local = LocalTraining(
            f.local_epochs,
            f.batch_size,
            cfg.seed,
            fabric.device,
            fabric.autocast,
            fp16=str(cfg.trainer.precision).startswith("16"),
        )

    def play_round(self, r: int) -> dict[str, float]:
        """Sample, train this rank's clients, exchange, aggregate, broadcast, count."""
        cfg, fabric, t0 = self.cfg, self.fabric, time.perf_counter()
        clients = sample_clients(cfg.seed, r, cfg.data.num_clients, cfg.fed.clients_per_round)
        results = [
            train_client(
                self.task,
                self.server.held,
                self.dm,
                c,
                r,
                self.local,
                self.plan,
                self.uplink,
                self.up_memory,
            )
            for c in clients[fabric.global_rank :: fabric.world_size]
        ]
        t_trained = time.perf_counter()
        results = exchange.gather(fabric, results)
        if self.up_memory is not None:
            for res in results:
                self.up_memory.residuals.update(res.residuals)  # keys: "client/tensor"
        agg = self.server.aggregate(results)
        t_down = time.perf_counter()
        broadcast = self.server.broadcast(r)
        compress_s = sum(res.compress_s for res in results) + time.perf_counter() - t_down
        for client, why in agg.rejected.items():
            fabric.print(f"round {r}: rejected client {client}: {why}")
        metrics: dict[str, float] = {"round": r, "train/loss": agg.train_loss}
        metrics |= self.bits.add_round(results, broadcast, cfg.fed.clients_per_round, self.plan)
        return (
            metrics
            | {
                "time/round_s": time.perf_counter() - t0,
                "time/train_s": t_trained - t0,  # this rank's clients
                "time/server_s": time.perf_counter() - t_trained,  # exchange to broadcast
                "time/compress_s": compress_s,
                "clients/accepted": len(agg.accepted),
                "clients/rejected": len(agg.rejected),
            }
            | {f"fedbat/{k}": v for k, v in agg.stats.items()}
        )

    def evaluate(self) -> dict[str, float]:
        self.task.load_state_dict(self.server.global_state())
        return self.task.evaluate(self.dm.test_batches(1024, self.fabric.device))

    def state_dict(self, completed: int, wandb_id: str | None) -> dict[str, Any]:
        return {
            "round": completed,
            "server": self.server.state_dict(),
            "uplink_memory": self.up_memory.state_dict() if self.up_memory is not None else {},
            "bits": self.bits.state_dict(),
            "history": self.history,
            "wandb_id": wandb_id or "",
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.server.load_state_dict(state["server"])
        if self.up_memory is not None:
            self.up_memory = ErrorFeedback(state["uplink_memory"])
        self.bits = BitCounter(**state["bits"])
        self.history = state["history"]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train ``cfg`` to ``fed.rounds`` rounds (resuming from ``run_dir`` when it holds a
    checkpoint of the same run); returns the run summary."""
    validate(cfg)
    run_dir, f = Path(cfg.run_dir), cfg.fed
    fabric = build_fabric(cfg)
    fabric.launch()
    torch.set_num_threads(threads_per_process(cfg, fabric))
    resume_state = _resume_state(cfg, run_dir)
    fed = Federation(cfg, fabric)
    start, wandb_id = 0, None
    if resume_state is not None:
        fed.load_state_dict(resume_state)
        start, wandb_id = resume_state["round"], resume_state["wandb_id"] or None
        fabric.print(f"resuming {run_dir} after round {start} of {f.rounds}")
    is_zero = fabric.global_rank == 0
    if is_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    loggers = build_loggers(cfg, run_dir, wandb_id, fed.history) if is_zero else []
    wandb_id = next((lg.version for lg in loggers if is_wandb(lg)), None)
    progress = RoundProgress(f.rounds, start, enabled=is_zero and cfg.progress)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    status = "failed"
    try:
        for r in range(start, f.rounds):
            metrics = fed.play_round(r)
            last = r + 1 == f.rounds
            if is_zero and ((r + 1) % f.eval_every == 0 or last):
                metrics |= fed.evaluate()
            fed.history.append(metrics)
            if is_zero:  # checkpoint first: a round that was logged is never lost
                if (r + 1) % cfg.checkpoint.every == 0 or last:
                    checkpoint.save(run_dir, fed.state_dict(r + 1, wandb_id))
                for lg in loggers:
                    lg.log_metrics(metrics, step=r)
            progress.update(metrics)
        summary = summarise(fed.history, cfg)
        if is_zero:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            for lg in filter(is_wandb, loggers):
                lg.experiment.summary.update(summary)
        status = "success"
        return summary
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.close()
        close_loggers(loggers, status)


def _resume_state(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """The checkpoint to resume from: ``resume=PATH``, or ``run_dir``'s with ``resume=auto``."""
    if cfg.resume in (False, "false", "never", None):
        return None
    path = run_dir / checkpoint.CHECKPOINT if cfg.resume == "auto" else Path(cfg.resume)
    if not path.is_file():
        return None
    state = checkpoint.load(path)
    check_resumable(cfg, state["config"], path)
    return state


def summarise(history: list[dict[str, float]], cfg: DictConfig) -> dict[str, Any]:
    """Best/final accuracy, total bits, and the uplink bits at which the run first reached
    ``target_acc`` (None when it never did)."""
    evals = [h for h in history if "test/acc" in h]
    target = cfg.get("target_acc")
    reached = next(
        (h["bits/uplink_cum"] for h in evals if target is not None and h["test/acc"] >= target),
        None,
    )
    last = history[-1] if history else {}
    return {
        "rounds": len(history),
        "final_acc": evals[-1]["test/acc"] if evals else None,
        "best_acc": max((h["test/acc"] for h in evals), default=None),
        "bits_uplink_total": last.get("bits/uplink_cum", 0),
        "bits_downlink_total": last.get("bits/downlink_cum", 0),
        "target_acc": target,
        "bits_uplink_to_target": reached,
    }
