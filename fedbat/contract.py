"""The LightningModule contract, as a federated client and server honour it.

A user's LightningModule runs in fedbat unchanged: ``training_step`` (a loss tensor or a
dict with ``"loss"``), ``configure_optimizers`` in every form Lightning accepts,
``test_step`` / ``validation_step`` with ``self.log`` for the server-side evaluation, and
the training hooks a client can call (``on_train_start``, ``on_train_epoch_start``,
``on_train_batch_start``, ``on_before_backward``, ... and their ``_end`` twins).
``configure_optimizers`` and the schedule across rounds: ``fedbat/optimization.py``.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedbat.errors import ConfigError


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
