"""Loggers glue: CSV always, TensorBoard and Weights & Biases on request; one metrics dict
goes to all of them through Fabric."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.fabric.loggers import CSVLogger, Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from fedbat import rundir
from fedbat.checkpoint import CHECKPOINT


def wandb_credentials(settings: Any) -> bool:
    """True when W&B holds credentials for its server (``settings.base_url``), found the way
    ``wandb.init`` finds them (environment, ``$NETRC`` or ``~/.netrc``, settings), without
    ever prompting."""
    try:
        from wandb.sdk.lib import wbauth
    except ImportError:  # a wandb without that module: the key in the environment or settings
        return bool(os.environ.get("WANDB_API_KEY") or getattr(settings, "api_key", None))
    try:
        auth = wbauth.authenticate_session(
            host=settings.base_url, source="fedbat", prompt=False, update_session=False
        )
    except Exception:  # malformed credentials count as none: the run goes offline
        return False
    return auth is not None


def wandb_mode(requested: str | None, run_dir: Path) -> str | None:
    """The mode for ``wandb.init``: ``logger.wandb.mode`` when set; else None, so that wandb
    resolves it itself (``WANDB_MODE``, ``wandb offline``/``wandb online``), except where
    that is online without credentials, which would prompt or fail: then offline, in one
    line."""
    if requested:
        return requested
    import wandb

    settings = wandb.setup().settings
    if settings.mode not in ("online", "run") or wandb_credentials(settings):
        return None
    print(
        f"fedbat: no W&B credentials for {settings.base_url}: logging offline "
        f"(after `wandb login`: wandb sync {run_dir}/wandb/offline-run-*)",
        file=sys.stderr,
    )
    return "offline"


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
        loggers.append(_wandb_logger(cfg, run_dir, wandb_id, history))
    return loggers


def _wandb_logger(
    cfg: DictConfig, run_dir: Path, wandb_id: str | None, history: list[dict[str, float]]
) -> Logger:
    import wandb
    from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

    WandbLogger = _with_bits_axis(LightningWandbLogger)
    w = cfg.logger.wandb
    config: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    mode = wandb_mode(w.get("mode"), run_dir)
    timeout = w.get("init_timeout")
    settings = wandb.Settings(init_timeout=timeout) if timeout else None

    def make(mode: str | None) -> Logger:
        return WandbLogger(
            project=w.project,
            entity=w.get("entity"),
            group=w.get("group"),
            tags=list(w.get("tags") or []),
            name=w.get("name"),
            save_dir=str(run_dir),
            id=wandb_id,
            resume="allow",
            config=config,
            settings=settings,
            **({"mode": mode} if mode else {}),
        )

    logger = make(mode)
    try:
        exp = logger.experiment
    except wandb.errors.Error as err:  # server unreachable, credentials refused
        if mode in ("offline", "disabled"):
            raise
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        print(f"fedbat: W&B is unreachable ({reason}): logging offline", file=sys.stderr)
        logger = make("offline")
        exp = logger.experiment
    exp.define_metric("round")
    for axis in AXES.values():
        exp.define_metric(axis)
    if wandb_id is None:  # a new W&B run of a run with history (logger switched): its curves
        for row in history:
            logger.log_metrics(row, step=int(row["round"]))
    return logger


BITS_AXIS = "vs_uplink_bits/"
CLOCK_AXIS = "vs_clock/"  # with a virtual clock (system.*, network.*): against sim/clock_s
AXES = {BITS_AXIS: "bits/uplink_cum", CLOCK_AXIS: "sim/clock_s"}


def _with_bits_axis(cls: type) -> type:
    """The WandbLogger that also logs test metrics under ``vs_uplink_bits/``, whose x-axis
    is the cumulative uplink bits, and with a virtual clock under ``vs_clock/`` against
    ``sim/clock_s``: "accuracy vs bits" and "accuracy vs time" are default charts in W&B."""

    class BitsAxisWandbLogger(cls):  # type: ignore[misc, valid-type]
        is_wandb = True
        defined: set[str]

        def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
            extra = {
                f"{prefix}{k}": v
                for prefix, axis in AXES.items()
                if axis in metrics
                for k, v in metrics.items()
                if k.startswith("test/")
            }
            self._define_axes([*metrics, *extra])
            super().log_metrics({**metrics, **extra}, step)

        def _define_axes(self, keys: list[str]) -> None:
            """Each metric's x-axis, defined by its exact name the first time it is logged
            (wandb leaves the match order of overlapping globs undefined)."""
            if not hasattr(self, "defined"):
                self.defined = {"round", *AXES.values()}
            for key in keys:
                if key in self.defined:
                    continue
                axis = next((a for p, a in AXES.items() if key.startswith(p)), "round")
                summary = "max,last" if key == "test/acc" else None
                self.experiment.define_metric(key, step_metric=axis, summary=summary)
                self.defined.add(key)

    return BitsAxisWandbLogger


ARTIFACT_FILES = (rundir.CONFIG, rundir.SUMMARY, CHECKPOINT)


def log_artifacts(experiment: Any, run_dir: Path) -> None:
    """The run's config, summary and final checkpoint as one W&B artifact (type ``run``),
    so a finished run can be fetched, compared or resumed from W&B alone."""
    import wandb

    artifact = wandb.Artifact(f"run-{experiment.id}", type="run")
    for name in ARTIFACT_FILES:
        if (run_dir / name).is_file():
            artifact.add_file(str(run_dir / name), name=name)
    experiment.log_artifact(artifact)


def close_loggers(loggers: list[Logger], status: str) -> None:
    """Flush and close every logger; a W&B run is finished so the next run (a sweep's next
    job in the same process, or a test) starts its own."""
    for lg in loggers:
        lg.finalize(status)
        if is_wandb(lg):
            lg.experiment.finish(exit_code=0 if status == "success" else 1)


def is_wandb(logger: Logger) -> bool:
    return getattr(logger, "is_wandb", False)
