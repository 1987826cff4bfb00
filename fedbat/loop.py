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


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train ``cfg`` to ``fed.rounds`` rounds (resuming from ``run_dir`` when it holds a
    checkpoint of the same run); returns the run summary."""
    validate(cfg)
    run_dir = Path(cfg.run_dir)
    fabric = build_fabric(cfg)
    fabric.launch()
    torch.set_num_threads(threads_per_process(cfg, fabric))
    resume_state = _resume_state(cfg, run_dir)
    dm = build_datamodule(cfg)
    task = build_task(cfg, dm).to(fabric.device)
    plan = wire_plan(task, cfg.policy.min_numel)
    uplink, downlink = build_pair(OmegaConf.to_container(cfg.compressor, resolve=True))
    f = cfg.fed
    server = Server(task, plan, uplink, downlink, f.server_lr, f.server_momentum, cfg.seed)
    up_memory = ErrorFeedback() if uplink.error_feedback and not uplink.lossless else None
    bits, history, start, wandb_id = BitCounter(), [], 0, None
    if resume_state is not None:
        server.load_state_dict(resume_state["server"])
        if up_memory is not None:
            up_memory = ErrorFeedback(resume_state["uplink_memory"])
        bits = BitCounter(**resume_state["bits"])
        history, start = resume_state["history"], resume_state["round"]
        wandb_id = resume_state.get("wandb_id") or None
        fabric.print(f"resuming {run_dir} after round {start} of {f.rounds}")
    is_zero = fabric.global_rank == 0
    if is_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    loggers = build_loggers(cfg, run_dir, wandb_id) if is_zero else []
    wandb_id = next((lg.version for lg in loggers if is_wandb(lg)), None)
    for row in history:  # the CSV is rebuilt from the checkpoint: no lost, no doubled rounds
        loggers[0].log_metrics(row, step=int(row["round"]))
    local = LocalTraining(
        f.local_epochs,
        f.batch_size,
        cfg.seed,
        fabric.device,
        fabric.autocast,
        fp16=str(cfg.trainer.precision).startswith("16"),
    )
    progress = RoundProgress(f.rounds, start, enabled=is_zero and cfg.progress)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    status = "failed"
    try:
        for r in range(start, f.rounds):
            t0 = time.perf_counter()
            clients = sample_clients(cfg.seed, r, cfg.data.num_clients, f.clients_per_round)
            mine = clients[fabric.global_rank :: fabric.world_size]
            results = [
                train_client(task, server.held, dm, c, r, local, plan, uplink, up_memory)
                for c in mine
            ]
            t_trained = time.perf_counter()
            results = exchange.gather(fabric, results)
            if up_memory is not None:
                for res in results:
                    up_memory.residuals.update(res.residuals)  # keys: "client/tensor"
            agg = server.aggregate(results)
            t_down = time.perf_counter()
            broadcast = server.broadcast(r)
            compress_s = sum(res.compress_s for res in results) + time.perf_counter() - t_down
            metrics: dict[str, float] = {"round": r, "train/loss": agg.train_loss}
            metrics |= bits.add_round(results, broadcast, f.clients_per_round, plan)
            metrics |= {
                "time/round_s": time.perf_counter() - t0,
                "time/train_s": t_trained - t0,  # this rank's clients
                "time/server_s": time.perf_counter() - t_trained,  # exchange to broadcast
                "time/compress_s": compress_s,
                "clients/accepted": len(agg.accepted),
                "clients/rejected": len(agg.rejected),
            }
            metrics |= {f"fedbat/{k}": v for k, v in agg.stats.items()}
            for client, why in agg.rejected.items():
                fabric.print(f"round {r}: rejected client {client}: {why}")
            if is_zero and ((r + 1) % f.eval_every == 0 or r + 1 == f.rounds):
                task.load_state_dict(server.global_state())
                metrics |= task.evaluate(dm.test_batches(1024, fabric.device))
            history.append(metrics)
            if is_zero:
                for lg in loggers:
                    lg.log_metrics(metrics, step=r)
                if (r + 1) % cfg.checkpoint.every == 0 or r + 1 == f.rounds:
                    _save(run_dir, r + 1, server, up_memory, bits, history, wandb_id, cfg)
            progress.update(metrics)
        summary = summarise(history, cfg)
        if is_zero:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            for lg in loggers:
                if is_wandb(lg):
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


def _save(
    run_dir: Path,
    completed: int,
    server: Server,
    up_memory: ErrorFeedback | None,
    bits: BitCounter,
    history: list[dict[str, float]],
    wandb_id: str | None,
    cfg: DictConfig,
) -> None:
    checkpoint.save(
        run_dir,
        {
            "round": completed,
            "server": server.state_dict(),
            "uplink_memory": up_memory.state_dict() if up_memory is not None else {},
            "bits": bits.state_dict(),
            "history": history,
            "wandb_id": wandb_id or "",
            "config": OmegaConf.to_yaml(cfg, resolve=True),
        },
    )


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
