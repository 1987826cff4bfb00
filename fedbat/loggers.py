"""Loggers glue: CSV always, TensorBoard and Weights & Biases on request; one metrics dict
goes to all of them through Fabric."""

from __future__ import annotations

import netrc
import os
import warnings
from pathlib import Path
from typing import Any

from lightning.fabric.loggers import CSVLogger, Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf


def wandb_credentials() -> bool:
    """True when W&B could log in without a prompt (API key in env or netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode(requested: str | None) -> str:
    """The explicit mode, else WANDB_MODE, else online with credentials and offline without:
    a run never stops at an interactive login prompt."""
    if requested:
        return requested
    return os.environ.get("WANDB_MODE") or ("online" if wandb_credentials() else "offline")


def build_loggers(
    cfg: DictConfig, run_dir: Path, wandb_id: str | None, history: list[dict[str, float]]
) -> list[Logger]:
    """CSV always (metrics.csv in ``run_dir``, rewritten from ``history``, the rounds of the
    checkpoint resumed from: none lost, none doubled), then TensorBoard and W&B on request."""
    lcfg = cfg.logger
    warnings.filterwarnings("ignore", message="Experiment logs directory")
    csv_logger = CSVLogger(str(run_dir), name="", version="", flush_logs_every_n_steps=1)
    for row in history:
        csv_logger.log_metrics(row, step=int(row["round"]))
    loggers: list[Logger] = [csv_logger]
    if lcfg.get("tensorboard"):
        loggers.append(TensorBoardLogger(str(run_dir), name="", version="tensorboard"))
    if lcfg.get("wandb"):
        loggers.append(_wandb_logger(cfg, run_dir, wandb_id))
    return loggers


def _wandb_logger(cfg: DictConfig, run_dir: Path, wandb_id: str | None) -> Logger:
    from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

    WandbLogger = _with_bits_axis(LightningWandbLogger)
    w = cfg.logger.wandb
    config: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    logger = WandbLogger(
        project=w.project,
        entity=w.get("entity"),
        group=w.get("group"),
        tags=list(w.get("tags") or []),
        name=w.get("name"),
        save_dir=str(run_dir),
        id=wandb_id,
        resume="allow",
        mode=wandb_mode(w.get("mode")),
        config=config,
    )
    exp = logger.experiment
    exp.define_metric("round")
    exp.define_metric("bits/uplink_cum")
    exp.define_metric("*", step_metric="round")
    exp.define_metric("test/acc", step_metric="round", summary="max,last")
    exp.define_metric(f"{BITS_AXIS}*", step_metric="bits/uplink_cum")
    return logger


BITS_AXIS = "vs_uplink_bits/"


def _with_bits_axis(cls: type) -> type:
    """The WandbLogger that also logs test metrics under ``vs_uplink_bits/``, whose x-axis
    is the cumulative uplink bits: "accuracy vs bits" is a default chart in the W&B UI."""

    class BitsAxisWandbLogger(cls):  # type: ignore[misc, valid-type]
        is_wandb = True

        def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
            extra = {f"{BITS_AXIS}{k}": v for k, v in metrics.items() if k.startswith("test/")}
            super().log_metrics({**metrics, **extra}, step)

    return BitsAxisWandbLogger


def close_loggers(loggers: list[Logger], status: str) -> None:
    """Flush and close every logger; a W&B run is finished so the next run (a sweep's next
    job in the same process, or a test) starts its own."""
    for lg in loggers:
        lg.finalize(status)
        if is_wandb(lg):
            lg.experiment.finish(exit_code=0 if status == "success" else 1)


def is_wandb(logger: Logger) -> bool:
    return getattr(logger, "is_wandb", False)
