"""BatchNorm running statistics in federated rounds (``fed.bn_stats``).

A client's running statistics move by ``momentum`` (0.1) per local step from the ones it
was sent. With few local steps a round (cross-device clients of 60 samples take one), the
averaged statistics of the global model trail its weights by many rounds, and evaluation,
which uses them, suffers while training, which uses batch statistics, does not. Three
rules (README, "BatchNorm statistics"):

- ``average``: they travel and are averaged with the update, like every buffer (default);
- ``local``: they never leave the clients (FedBN's rule for statistics, Li et al. 2021); the
  server holds none, so the global model is evaluated with each batch's own statistics;
- ``recompute``: after each round's aggregation the server re-estimates them for its new
  model from a forward pass over proxy data (the training data of ``fed.bn_clients``
  clients drawn once from the run seed), a cumulative average, not a momentum.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedbat.contract import LogCollector, training_loss
from fedbat.seeding import BN_PROXY, generator, sample_from

RULES = ("average", "local", "recompute")
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _tracking(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats
    ]


def statistics_names(model: nn.Module) -> set[str]:
    """The names, in ``model.state_dict()``, of its BatchNorm running statistics.

    >>> sorted(statistics_names(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))))
    ['1.num_batches_tracked', '1.running_mean', '1.running_var']
    """
    return {f"{name}.{s}" if name else s for name, _ in _tracking(model) for s in STATISTICS}


def local_statistics(cfg: Any, model: nn.Module) -> set[str]:
    """The statistics that stay on the clients: all of them under ``fed.bn_stats=local``."""
    return statistics_names(model) if cfg.fed.get("bn_stats") == "local" else set()


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Inside, every BatchNorm layer normalises with the statistics of the batch it is given,
    in eval mode too, and its running statistics are neither used nor changed.

    >>> bn = nn.BatchNorm1d(1).eval()
    >>> with batch_statistics(bn):
    ...     [round(v, 4) for v in bn(torch.tensor([[1.0], [3.0]])).flatten().tolist()]
    [-1.0, 1.0]
    >>> bn.running_mean.tolist(), round(bn(torch.tensor([[1.0]])).item(), 4)
    ([0.0], 1.0)
    """
    layers = [m for _, m in _tracking(model)]
    saved = [(m.running_mean, m.running_var) for m in layers]
    for m in layers:  # no running statistics: BatchNorm's forward takes the batch's
        m.running_mean, m.running_var, m.track_running_stats = None, None, False
    try:
        yield
    finally:
        for m, (mean, var) in zip(layers, saved, strict=True):
            m.running_mean, m.running_var, m.track_running_stats = mean, var, True


def proxy_batches(
    data: Any, clients: int, batch_size: int, seed: int, fabric: Any
) -> Iterator[Any]:
    """The batches ``recompute`` takes the statistics from: the training data of ``clients``
    clients (all, when there are fewer) drawn once from ``seed``, each shuffled by a
    generator of its own."""
    n = data.num_clients
    for c in sample_from(range(n), min(clients, n), seed, BN_PROXY):
        yield from data.client_batches(c, batch_size, generator(seed, c, BN_PROXY), fabric.device)


@torch.no_grad()
def recompute(task: nn.Module, batches: Iterable[Any]) -> None:
    """Re-estimate ``task``'s running statistics from ``training_step`` forward passes over
    ``batches`` in train mode: the plain mean of the batches' statistics (momentum None),
    as if every batch were seen by one model. Counters keep their values; random state is
    left as it was (dropout draws during the passes do not shift a run's later draws)."""
    layers = [m for _, m in _tracking(task)]
    if not layers:
        return
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    was_training = task.training
    LogCollector().attach(task)  # what the step logs goes nowhere
    with torch.random.fork_rng(devices=[]):
        task.train()
        for i, batch in enumerate(batches):
            training_loss(task.training_step(batch, i))
    task.train(was_training)
    for m, (momentum, count) in zip(layers, saved, strict=True):
        m.momentum = momentum
        m.num_batches_tracked.copy_(count)
