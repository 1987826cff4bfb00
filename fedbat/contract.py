"""The LightningModule contract, as a federated client and server honour it.

A user's LightningModule runs in fedbat unchanged: ``training_step`` (a loss tensor or a
dict with ``"loss"``), ``configure_optimizers`` in every form Lightning accepts,
``test_step`` / ``validation_step`` with ``self.log`` for the server-side evaluation, and
the training hooks a client can call (``on_train_start``, ``on_train_epoch_start``,
``on_train_batch_start``, ``on_before_backward``, ... and their ``_end`` twins).

Across rounds, a learning-rate scheduler belongs to the server: every client of round r
starts from the schedule's state after round r - 1, and the server advances it once per
round (``interval: "epoch"``: a round is the federation's epoch) or by the local steps of
the round's longest client (``interval: "step"``, where the client also steps it). Its
state is saved in the checkpoint, so a resumed run continues the schedule exactly.

What a client cannot honour fails before any work, in one line: manual optimization,
several optimizers, ``ReduceLROnPlateau`` (it needs a monitored metric every step).
"""

from __future__ import annotations

import copy
import numbers
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


def training_loss(output: Any) -> torch.Tensor:
    """The loss of ``training_step``'s result: a tensor, or a dict with ``"loss"``."""
    if isinstance(output, Mapping):
        if "loss" not in output:
            raise ConfigError(
                f"task: training_step returned a dict without 'loss' (keys: "
                f"{', '.join(map(str, output)) or 'none'}); put the loss tensor under 'loss'"
            )
        output = output["loss"]
    if not isinstance(output, torch.Tensor):
        raise ConfigError(
            f"task: training_step returned {type(output).__name__}; it must return the loss "
            "tensor or a dict with 'loss' (returning None to skip a batch is not supported)"
        )
    return output


def probe_training_step(module: nn.Module, batch: Any) -> set[str]:
    """Run ``training_step`` once on ``batch`` (with the training hooks before it), on a copy
    and without touching any random state, so that a step that cannot be trained (returning
    None) fails before a run writes anything. Returns the buffers the step changed (BN
    statistics, counters): the others are frozen, as parameters without gradients are."""
    probe = copy.deepcopy(module)
    LogCollector().attach(probe)
    before = {n: b.clone() for n, b in probe.named_buffers()}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        probe.train()
        for hook in ("on_train_start", "on_train_epoch_start"):
            call_hook(probe, hook)
        call_hook(probe, "on_train_batch_start", batch, 0)
        training_loss(probe.training_step(batch, 0))
    after = dict(probe.named_buffers())
    return {n for n, b in before.items() if not torch.equal(b, after[n])}


class LogCollector:
    """Receives ``self.log`` / ``self.log_dict`` while fedbat runs a module's steps, and
    reduces them as Lightning does at the end of an epoch: a mean weighted by batch size,
    or the ``compute()`` of a logged torchmetrics Metric."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.metrics: dict[str, Any] = {}
        self.order: dict[str, None] = {}  # names in the order first logged
        self.batch_size = 1

    def log(
        self, name: str, value: Any, *args: Any, batch_size: int | None = None, **kw: Any
    ) -> None:
        self.order.setdefault(name)
        if hasattr(value, "compute") and hasattr(value, "update"):  # a torchmetrics Metric
            self.metrics[name] = value
            return
        if isinstance(value, torch.Tensor):
            value = value.detach().float().mean().item()
        if not isinstance(value, numbers.Number):
            raise ConfigError(
                f"task: self.log({name!r}, {type(value).__name__}): a number, tensor or Metric"
            )
        w = float(batch_size or self.batch_size)
        self.sums[name] = self.sums.get(name, 0.0) + float(value) * w
        self.weights[name] = self.weights.get(name, 0.0) + w

    def log_dict(self, dictionary: Mapping[str, Any], *args: Any, **kw: Any) -> None:
        for name, value in dictionary.items():
            self.log(name, value, *args, **kw)

    def compute(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.weights[k] for k in self.sums if self.weights[k]}
        for name, metric in self.metrics.items():
            # one process evaluates: a cross-process sync of the state would wait forever
            # (torchmetrics reads ``_to_sync``, set from ``sync_on_compute`` at construction)
            synced = metric._to_sync
            metric._to_sync = False
            try:
                out[name] = float(metric.compute())
            finally:
                metric._to_sync = synced
            metric.reset()
        return {k: out[k] for k in self.order if k in out}

    def attach(self, module: nn.Module) -> LogCollector:
        """Route ``module.log`` / ``log_dict`` here (instance attributes shadow the methods)."""
        module.log = self.log  # type: ignore[method-assign]
        module.log_dict = self.log_dict  # type: ignore[method-assign]
        return self


def batch_size_of(batch: Any) -> int:
    """The leading size of the first tensor in ``batch`` (tuple, list, dict or tensor)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    items = (
        batch.values()
        if isinstance(batch, Mapping)
        else batch
        if isinstance(batch, list | tuple)
        else []
    )
    for item in items:
        size = batch_size_of(item)
        if size:
            return size
    return 0


def overrides(module: nn.Module, hook: str) -> bool:
    """True when ``module``'s class defines ``hook`` itself (not LightningModule's no-op)."""
    import lightning as L

    return getattr(type(module), hook, None) is not getattr(L.LightningModule, hook, None)


def call_hook(module: nn.Module, hook: str, *args: Any) -> None:
    fn = getattr(module, hook, None)
    if fn is not None:
        fn(*args)


def evaluation_plan(module: nn.Module, val: Any, test: Any) -> list[tuple[str, Any]]:
    """Which step runs on which data, validation first: ``validation_step`` on the
    validation data and ``test_step`` on the test data, as Lightning runs them; a module
    with only one of the two steps runs it on whichever data there is (validation first)."""
    has_val, has_test = overrides(module, "validation_step"), overrides(module, "test_step")
    plan = []
    if has_val and (val is not None or (not has_test and test is not None)):
        plan.append(("validation", val if val is not None else test))
    if has_test and (test is not None or (not has_val and val is not None)):
        plan.append(("test", test if test is not None else val))
    return plan


@torch.no_grad()
def evaluate(module: nn.Module, stage: str, batches: Any) -> dict[str, float]:
    """``<stage>_step`` over ``batches`` in eval mode, returning what the steps passed to
    ``self.log``, reduced per epoch, in the order first logged."""
    step = getattr(module, f"{stage}_step")
    logs = LogCollector().attach(module)
    was_training = module.training
    module.eval()
    call_hook(module, f"on_{stage}_epoch_start")
    for batch_idx, batch in enumerate(batches):
        logs.batch_size = batch_size_of(batch)
        step(batch, batch_idx)
    call_hook(module, f"on_{stage}_epoch_end")
    module.train(was_training)
    return logs.compute()
