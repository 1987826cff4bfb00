"""What a client's optimizer is, from ``configure_optimizers`` in every form Lightning
accepts, and the learning-rate schedule across rounds, which belongs to the server: every
client of round r starts from the schedule's state after round r - 1, and the server
advances it once per round (``interval: "epoch"``: a round is the federation's epoch) or by
the local steps of the round's longest client (``interval: "step"``, where the client also
steps it). Its state is saved in the checkpoint, so a resumed run continues the schedule
exactly. Manual optimization, several optimizers and ``ReduceLROnPlateau`` (it needs a
monitored metric every step) fail before any work, in one line."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedbat.errors import ConfigError

INTERVALS = ("epoch", "step")


@dataclass
class Optimization:
    """What ``configure_optimizers`` returned, normalised."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    interval: str = "epoch"
    frequency: int = 1


def _scheduler_entry(entry: Any) -> tuple[Any, str, int]:
    if isinstance(entry, Mapping):
        interval, frequency = entry.get("interval", "epoch"), entry.get("frequency", 1)
        if interval not in INTERVALS:
            raise ConfigError(f"task: lr_scheduler interval={interval!r}: must be epoch or step")
        if not isinstance(frequency, int) or isinstance(frequency, bool) or frequency < 1:
            raise ConfigError(f"task: lr_scheduler frequency={frequency!r}: must be >= 1")
        return entry.get("scheduler"), interval, frequency
    return entry, "epoch", 1


def optimization(module: nn.Module) -> Optimization:
    """``module.configure_optimizers()`` in any of Lightning's forms: an optimizer; a list or
    tuple of one; ``([opt], [sched])``; a dict with ``optimizer`` and ``lr_scheduler`` (a
    scheduler or a dict with ``scheduler``, ``interval``, ``frequency``)."""
    if not getattr(module, "automatic_optimization", True):
        raise ConfigError(
            "task: manual optimization (automatic_optimization = False) cannot be federated: "
            "fedbat's clients run the optimizer step themselves"
        )
    out = module.configure_optimizers()
    schedulers: list[Any] = []
    if isinstance(out, Mapping):
        optimizers = [out.get("optimizer")]
        if out.get("lr_scheduler") is not None:
            schedulers = [out["lr_scheduler"]]
    elif (
        isinstance(out, list | tuple)
        and len(out) == 2
        and all(isinstance(part, list | tuple) for part in out)
    ):
        optimizers, schedulers = list(out[0]), list(out[1])
    elif isinstance(out, list | tuple):
        optimizers = [o.get("optimizer") if isinstance(o, Mapping) else o for o in out]
        schedulers = [
            o["lr_scheduler"] for o in out if isinstance(o, Mapping) and "lr_scheduler" in o
        ]
    else:
        optimizers = [out]
    if len(optimizers) != 1 or not isinstance(optimizers[0], torch.optim.Optimizer):
        raise ConfigError(
            f"task: configure_optimizers gave {len(optimizers)} optimizer(s) "
            f"({', '.join(type(o).__name__ for o in optimizers)}); a federated client trains "
            "with exactly one torch.optim.Optimizer"
        )
    if len(schedulers) > 1:
        raise ConfigError(
            f"task: configure_optimizers gave {len(schedulers)} lr schedulers; one at most"
        )
    if not schedulers:
        return Optimization(optimizers[0])
    scheduler, interval, frequency = _scheduler_entry(schedulers[0])
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ConfigError(
            "task: ReduceLROnPlateau is not supported (clients have no monitored metric); "
            "use a schedule of rounds or steps"
        )
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise ConfigError(f"task: lr_scheduler {type(scheduler).__name__} is not an LRScheduler")
    return Optimization(optimizers[0], scheduler, interval, frequency)


class ServerSchedule:
    """The learning-rate schedule's state across rounds, owned by the server."""

    def __init__(self, module: nn.Module) -> None:
        self.opt = optimization(module)  # validates the contract before any work
        self.steps = 0  # scheduler steps taken so far
        self.counted = 0  # rounds (interval epoch) or local steps (interval step) so far

    @property
    def active(self) -> bool:
        return self.opt.scheduler is not None

    def state_dict(self) -> dict[str, Any]:
        sched = self.opt.scheduler
        return {
            "steps": self.steps,
            "counted": self.counted,
            "scheduler": sched.state_dict() if sched else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self.counted = int(state.get("counted", 0))
        if self.opt.scheduler is not None and state.get("scheduler"):
            _continue(self.opt, state["scheduler"])

    @property
    def lr(self) -> float | None:
        """The scheduled learning rate of the round about to be trained."""
        return self.opt.scheduler.get_last_lr()[0] if self.opt.scheduler is not None else None

    def start_client(self, opt: Optimization) -> None:
        """A client's fresh scheduler continues from the server's: same state, same lr."""
        if opt.scheduler is not None and self.opt.scheduler is not None:
            _continue(opt, self.opt.scheduler.state_dict())

    def client_steps_scheduler(self, opt: Optimization, step: int) -> bool:
        """Whether a client steps its scheduler after its local step ``step`` (0-based):
        ``interval: step`` counts local steps on from the server's count."""
        return (
            opt.scheduler is not None
            and opt.interval == "step"
            and (self.counted + step + 1) % opt.frequency == 0
        )

    def end_round(self, longest_client_steps: int) -> None:
        """Advance by one round (``epoch``) or by the round's longest local training (``step``)."""
        if self.opt.scheduler is None:
            return
        f = self.opt.frequency
        done = 1 if self.opt.interval == "epoch" else longest_client_steps
        ticks = (self.counted + done) // f - self.counted // f
        self.counted += done
        with warnings.catch_warnings():  # no optimizer.step() on the server's copy: expected
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
            for _ in range(ticks):
                self.opt.scheduler.step()
        self.steps += ticks


def _continue(opt: Optimization, scheduler_state: dict[str, Any]) -> None:
    """Load a scheduler's state and give its optimizer the lr it had reached (loading alone
    leaves the optimizer at its initial lr, from which chainable schedulers go on)."""
    assert opt.scheduler is not None
    opt.scheduler.load_state_dict(scheduler_state)
    for group, lr in zip(opt.optimizer.param_groups, opt.scheduler.get_last_lr(), strict=False):
        group["lr"] = lr
