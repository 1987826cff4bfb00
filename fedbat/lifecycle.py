"""A run's life as a process: the run dir locked, Fabric launched, rounds played and
checkpointed, loggers opened and closed, signals (SIGTERM, Ctrl-C, SLURM's SIGUSR1) turned
into a clean stop that says what was kept, and the checkpoint to resume from."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric import Fabric
from omegaconf import DictConfig, OmegaConf

from fedbat import checkpoint, clientstore, rundir, slurm
from fedbat.assembly import build_components, build_fabric, describe_plan, threads_per_process
from fedbat.client import ClientData
from fedbat.config import cap_rounds, check_resumable, validate
from fedbat.errors import CheckpointError, ConfigError, RunDirError
from fedbat.federation import Federation
from fedbat.loggers import build_loggers, close_loggers, is_wandb, log_artifacts
from fedbat.progress import RoundProgress
from fedbat.results import summarise, unlogged_monitor
from fedbat.rundir import RunDirLock
from fedbat.transport import Transport


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, as an exception so that cleanup runs; it knows what was kept.
    SIGUSR1 (SLURM pre-emption) stops after a round, checkpointed; ``requeued`` says what
    became of the job."""

    def __init__(self, signame: str, saved_round: int | None = None) -> None:
        super().__init__(signame)
        self.signame, self.saved_round = signame, saved_round
        self.requeued = ""

    @property
    def exit_code(self) -> int:
        if self.signame == "SIGUSR1":
            return 0 if self.requeued.startswith("requeued") else 138
        return 143 if self.signame == "SIGTERM" else 130

    def message(self) -> str:
        if self.signame == "SIGUSR1":
            return f"SIGUSR1: stopped after round {self.saved_round}, checkpointed; {self.requeued}"
        kept = (
            f"the checkpoint after round {self.saved_round} is intact: rerun the same command "
            "to resume"
            if self.saved_round
            else "no round had completed, so there is no checkpoint to resume from"
        )
        return f"interrupted ({self.signame}); {kept}"


def _on_sigterm(signum: int, frame: object) -> None:
    raise Interrupted("SIGTERM")


def run(
    cfg: DictConfig,
    task: L.LightningModule | None = None,
    data: ClientData | None = None,
    transport: Transport | None = None,
    launcher: int | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` to ``fed.rounds`` rounds (resuming from ``run_dir`` when it holds a
    checkpoint of the same run); returns the run summary.

    Rank 0 locks the run dir before the other ranks start, unless the process ``launcher``
    holds the lock for this run (``fedbat flower``: it must); an invalid config, damaged
    checkpoint or unusable run dir is a ConfigError, raised before anything is written
    (a run dir this left empty is removed).
    """
    run_dir = Path(cfg.run_dir)
    lock = RunDirLock(run_dir)
    threads = torch.get_num_threads()
    previous_usr1 = signal.signal(signal.SIGUSR1, slurm.STOP)
    try:
        cap_rounds(cfg)
        validate(cfg)
        fabric = build_fabric(cfg)
        if fabric.global_rank == 0:
            rundir.prepare(run_dir)
            if launcher is None:
                lock.acquire()
            elif (holder := lock.holder()) != launcher:
                raise RunDirError(
                    f"run_dir={run_dir}: its launcher (process {launcher}) does not hold it "
                    f"(held by {holder or 'no one'})"
                )
            rundir.remove_stale(run_dir)
            clientstore.remove_stale(run_dir)
        fabric.launch()
        torch.set_num_threads(threads_per_process(cfg, fabric))
        summary = _train(cfg, fabric, run_dir, task, data, transport)
        _leave_process_group(fabric)
        return summary
    except Interrupted as stopped:
        if stopped.signame == "SIGUSR1":
            lock.release()  # before the requeue: the next allocation takes the run dir
            stopped.requeued = slurm.requeue(fabric.global_rank == 0)
        raise
    except ConfigError:
        lock.release()
        if run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # an empty dir holds nothing: leave no trace of a refused run
        raise
    finally:
        lock.release()
        torch.set_num_threads(threads)
        signal.signal(signal.SIGUSR1, previous_usr1)


def _leave_process_group(fabric: Fabric) -> None:
    """Wait for every rank, then close the process group: a rank that exits while the
    group's threads still run may abort ("terminate called without an active exception")."""
    if fabric.world_size > 1 and torch.distributed.is_initialized():
        fabric.barrier()
        torch.distributed.destroy_process_group()


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


def return_freed_memory() -> None:
    """Give the heap the round freed back to the OS before an evaluation adds its own peak.
    glibc keeps it otherwise, so a round's packets (100 fp32 cnn4 updates: 157 MB) stay in
    the process's RSS beside the evaluation's activations. Not after every round: the next
    round would pay the page faults of taking it back. Without glibc this does nothing."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _train(
    cfg: DictConfig,
    fabric: Fabric,
    run_dir: Path,
    task: L.LightningModule | None,
    data: ClientData | None,
    transport: Transport | None,
) -> dict[str, Any]:
    f, stop = cfg.fed, slurm.STOP
    resumed = resume_state(cfg, run_dir)
    fed = Federation(build_components(cfg, fabric, task, data), transport)
    strategy = fed.server.strategy
    for line in (describe_plan(fed.plan, fed.task), strategy.describe()):
        if line:
            fabric.print(line)
    start, wandb_id, saved = 0, None, None
    if resumed is not None:
        try:
            fed.load_state_dict(resumed)
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise CheckpointError(
                f"resume: the checkpoint does not fit this run ({str(err).splitlines()[0][:160]})"
            ) from None
        start, wandb_id = resumed["round"], resumed["wandb_id"] or None
        saved = start
        fabric.print(f"resuming {run_dir} after round {start} of {f.rounds}")
    is_zero = fabric.global_rank == 0
    with _writing(run_dir):
        if is_zero:
            (run_dir / rundir.CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        loggers = build_loggers(cfg, run_dir, wandb_id, fed.history) if is_zero else []
    wandb_id = next((lg.version for lg in loggers if is_wandb(lg)), None)
    progress = RoundProgress(f.rounds, start, enabled=is_zero and cfg.progress)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    status = "failed"
    try:
        for r in range(start, f.rounds):
            if why := fed.stop_reason():  # e.g. the privacy budget: checkpointed already
                fabric.print(why)
                break
            metrics = fed.play_round(r)
            last = r + 1 == f.rounds or bool(fed.stop_reason())
            if is_zero and ((r + 1) % f.eval_every == 0 or last):
                return_freed_memory()
                metrics |= fed.evaluate()
            fed.history.append(metrics)
            stopping = not last and stop.agreed(fabric)
            save = (r + 1) % cfg.checkpoint.every == 0 or last or stopping
            if is_zero:  # checkpoint first: a round that was logged is never lost
                with _writing(run_dir):
                    if save:
                        checkpoint.save(run_dir, fed.state_dict(r + 1, wandb_id))
                        fed.store.collect()
                    for lg in loggers:
                        lg.log_metrics(metrics, step=r + 1)
            if save:
                saved = r + 1
            progress.update(metrics, fed.monitor)
            if stopping:
                stop.asked = False  # consumed: a later run in this process starts afresh
                raise Interrupted("SIGUSR1", saved)
        summary = summarise(fed.history, cfg, fed.monitor)
        if summary["final_acc"] is None:
            fabric.print(unlogged_monitor(fed.history, summary["monitor"]))
        if is_zero:
            with _writing(run_dir):
                (run_dir / rundir.SUMMARY).write_text(json.dumps(summary, indent=2))
            for lg in filter(is_wandb, loggers):
                lg.experiment.summary.update(summary)
                if cfg.logger.wandb.get("artifacts"):
                    log_artifacts(lg.experiment, run_dir)
        status = "success"
        return summary
    except Interrupted as interrupt:
        if interrupt.signame == "SIGUSR1":
            raise
        raise Interrupted(interrupt.signame, saved) from None
    except KeyboardInterrupt:
        raise Interrupted("SIGINT", saved) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.close()
        close_loggers(loggers, status)


@contextmanager
def _writing(run_dir: Path) -> Iterator[None]:
    """A write into the run dir that fails (deleted, read-only, disk full) is one line."""
    try:
        yield
    except OSError as err:
        ok = (run_dir / checkpoint.CHECKPOINT).is_file()
        kept = "its last checkpoint is kept" if ok else "no checkpoint was written"
        raise RunDirError(
            f"run_dir={run_dir}: cannot write {err.filename or ''} ({err.strerror}); {kept}"
        ) from None


def resume_state(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """The checkpoint to resume from: ``resume=PATH``, or ``run_dir``'s with ``resume=auto``."""
    if cfg.resume in (False, "false", "never", None):
        return None
    path = run_dir / checkpoint.CHECKPOINT if cfg.resume == "auto" else Path(cfg.resume)
    if not path.is_file():
        return None
    state = checkpoint.load(path)
    check_resumable(cfg, state["config"], path)
    if state["round"] > cfg.fed.rounds:
        raise ConfigError(
            f"fed.rounds={cfg.fed.rounds}: the checkpoint {path} has already completed "
            f"{state['round']} rounds; use fed.rounds>={state['round']}, another run_dir, "
            "or resume=false to start over"
        )
    return state
