"""Local training of one client and the encoding of its update (docs/architecture.md,
"One round", steps 2-4)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from lightning.fabric import Fabric
from torch.nn.utils import parametrize

from fedbat.clientstate import ClientState
from fedbat.compressors import (
    Compressor,
    Memory,
    TensorSpec,
    decode_fields,
    encode_fields,
)
from fedbat.compressors.base import all_finite_in
from fedbat.compressors.packet import pack
from fedbat.compressors.plan import load_model
from fedbat.compressors.update import SharedSeed
from fedbat.contract import (
    LogCollector,
    batch_size_of,
    call_hook,
    training_loss,
)
from fedbat.errors import ConfigError
from fedbat.hooks import ClientHook
from fedbat.optimization import ServerSchedule, optimization
from fedbat.seeding import derive_seed, generator, seed_torch
from fedbat.strategies import Strategy


class ClientData(Protocol):
    """What local training needs of a dataset split over clients: the built-in in-memory
    ``FederatedDataModule`` and ``DatasetClients`` (any Dataset, lazily) both provide it."""

    num_clients: int

    def client_size(self, client: int) -> int: ...

    def client_batches(
        self, client: int, batch_size: int, generator: torch.Generator, device: Any
    ) -> Iterator[Any]: ...

    def test_batches(self, batch_size: int, device: Any) -> Iterator[Any] | None: ...

    # optional: ``val_batches(batch_size, device)``, the validation data (None without);
    # ``probe_client``, the client whose first batch :func:`probe_batch` takes (default 0)


def probe_batch(data: ClientData, batch_size: int, device: Any) -> Any | None:
    """A batch to try a training step on: a client's first, or, where no client's data is
    here (a server whose clients hold their own), the evaluation data's first."""
    client = getattr(data, "probe_client", 0)
    batch = next(data.client_batches(client, batch_size, torch.Generator(), device), None)
    if batch is None:
        batch = next(data.test_batches(batch_size, device) or iter(()), None)
    return batch


@dataclass(kw_only=True)
class ClientResult:
    """What a client hands to the exchange: its packet and the facts the server weighs
    (built by name: a reordered field can never shift the others)."""

    client: int
    data: bytes = b""
    payload_bits: int = 0
    num_samples: int = 0
    train_loss: float = math.nan
    compress_s: float = 0.0
    failure: str = ""  # why the client sent nothing (its packet is then empty)
    logs: dict[str, float] = field(default_factory=dict)  # training_step's self.log, averaged
    state: ClientState = field(default_factory=ClientState)  # its own, kept until next time
    stored: bool = False  # its state went to the client store
    reset: str = ""  # why its stored state was dropped before it trained (a damaged file)

    @property
    def ok(self) -> bool:
        return not self.failure


@dataclass
class LocalTraining:
    """The client-side settings of a run; ``fabric`` does backward, precision and the
    optimizer step (None: plain PyTorch, for unit tests on CPU)."""

    epochs: int
    batch_size: int
    seed: int
    device: torch.device
    fabric: Fabric | None = None

    def steps(self, num_samples: int) -> int:
        """Local optimizer steps of a client holding ``num_samples`` samples."""
        return self.epochs * math.ceil(num_samples / self.batch_size)


@dataclass(frozen=True, kw_only=True)
class ClientSetup:
    """What every client of a run shares: the worker module, the data, how a client trains
    and what it sends. Built once (``fedbat/assembly.py``), by the in-job round and the
    Flower ClientApp alike."""

    task: torch.nn.Module  # a reused worker LightningModule on ``local.device``
    data: ClientData
    local: LocalTraining
    plan: list[TensorSpec]
    uplink: Compressor
    schedule: ServerSchedule | None = None
    strategy: Strategy | None = None
    local_buffers: frozenset[str] = frozenset()  # buffers that change but stay (fed.bn_stats)


@dataclass(kw_only=True)
class ClientJob:
    """One client's round: who, when, and from what it holds: ``held`` (the model), the
    strategy's broadcast state ``extra``, and its own ``state`` from its last round."""

    client: int
    round: int
    held: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    state: ClientState = field(default_factory=ClientState)


def train_client(setup: ClientSetup, job: ClientJob) -> ClientResult:
    """Train ``job.client`` from the weights it holds and encode ``w_client - held``.

    The task runs under its own contract (``fedbat/contract.py``); all of this client's
    randomness (data order, FedBAT draws, dropout) is seeded by (seed, round, client).
    """
    task, data, cfg, plan, uplink = setup.task, setup.data, setup.local, setup.plan, setup.uplink
    strategy = setup.strategy
    client, round_idx, held, extra = job.client, job.round, job.held, job.extra
    mine = job.state
    memory = Memory.of_holder(client, mine.residuals, mine.compressor) if uplink.remembers else None
    seed = derive_seed(cfg.seed, round_idx, client)
    seed_torch(seed, cfg.device)
    data_gen = torch.Generator().manual_seed(seed)
    load_model(task, held)
    task.train()
    n = data.client_size(client)
    hooks = [  # the strategy's first: FedProx's term sees the layers as FedBAT parametrizes them
        h
        for h in (
            strategy.client_hook(task, held, extra, job.state.strategy) if strategy else None,
            uplink.training_hook(task, [s.name for s in plan if s.compressed], cfg.steps(n)),
        )
        if h is not None
    ]
    loss_sum, logs = _local_epochs(setup, client, data_gen, hooks)
    start = time.perf_counter()
    latent = {k: v for h in hooks for k, v in h.latent().items()}
    train_loss = float(loss_sum) / max(cfg.steps(n), 1)
    state = task.state_dict()
    names = [s.name for s in plan]
    diffs = torch._foreach_sub([state[k].detach().cpu() for k in names], [held[k] for k in names])
    update = dict(zip(names, diffs, strict=True))
    _check_frozen(state, held, update.keys() | setup.local_buffers)
    update |= latent
    for h in hooks:
        update = h.transform(update)
    sent = {k: update[k] for k in latent}
    preencoded = {k: v for h in hooks for k, v in h.encode_latent(sent).items()}
    if not math.isfinite(train_loss) or not all_finite_in(update.values()):
        why = f"non-finite local training (loss {train_loss})"
        return ClientResult(client=client, num_samples=n, train_loss=train_loss, failure=why)
    gen = generator(seed)
    shared = SharedSeed(cfg.seed, round_idx, client)
    fields = encode_fields(update, plan, uplink, gen, memory, client, preencoded, shared)
    new_state = {}
    if strategy is not None and (extra_plan := strategy.extra_plan(plan)):
        sent, _ = decode_fields(fields, plan, uplink, shared=shared)
        message = {k: v for h in hooks for k, v in h.message(sent).items()}
        fields |= encode_fields(message, extra_plan, uplink, gen, memory, client, shared=shared)
        new_state = {k: v for h in hooks for k, v in h.client_state().items()}
    packet = pack(fields, uplink)
    memory = memory or Memory()
    return ClientResult(
        client=client,
        data=packet.data,
        payload_bits=packet.payload_bits,
        num_samples=n,
        train_loss=train_loss,
        compress_s=time.perf_counter() - start,
        logs=logs,
        state=ClientState(memory.of(client), new_state, memory.state_of(client)),
    )


def _check_frozen(
    state: dict[str, torch.Tensor], held: dict[str, torch.Tensor], travel: Collection[str]
) -> None:
    """Frozen tensors never travel after the first model, so one that local training changed
    would silently lose the change: that is refused, naming it."""
    for name, value in held.items():
        if name not in travel and not torch.equal(state[name].detach().cpu(), value):
            raise ConfigError(
                f"task: {name} changed in local training although it is frozen (a parameter "
                "with requires_grad=False, or a buffer the first training step left alone); "
                f"give it requires_grad=True, or policy.travel=[{name}] for a buffer"
            )


def _local_epochs(
    setup: ClientSetup, client: int, data_gen: torch.Generator, hooks: list[ClientHook]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Lightning's training loop for one client, hooks in Lightning's order; returns the
    summed loss and what ``training_step`` passed to ``self.log``."""
    task, data, cfg, schedule = setup.task, setup.data, setup.local, setup.schedule
    opt = optimization(task)
    if schedule is not None:
        schedule.start_client(opt)
    fabric = cfg.fabric
    optimizer = fabric.setup_optimizers(opt.optimizer) if fabric else opt.optimizer
    backward = fabric.backward if fabric else torch.Tensor.backward
    autocast = fabric.autocast if fabric else nullcontext
    convert = input_conversion(fabric)
    logs = LogCollector().attach(task)
    loss_sum, step = torch.zeros((), device=cfg.device), 0
    call_hook(task, "on_train_start")
    for _epoch in range(cfg.epochs):
        call_hook(task, "on_train_epoch_start")
        batches = data.client_batches(client, cfg.batch_size, data_gen, cfg.device)
        for batch_idx, batch in enumerate(map(convert, batches)):
            logs.batch_size = batch_size_of(batch)
            call_hook(task, "on_train_batch_start", batch, batch_idx)
            with autocast(), parametrize.cached():  # hooks see the weights the step used
                out = task.training_step(batch, batch_idx)
                loss = training_loss(out)
                objective = loss  # what is minimised; the logged train loss stays the task's
                for h in hooks:
                    objective = h.loss(objective)
            optimizer.zero_grad(set_to_none=True)
            call_hook(task, "on_before_backward", objective)
            backward(objective)
            call_hook(task, "on_after_backward")
            call_hook(task, "on_before_optimizer_step", optimizer)
            for h in hooks:
                h.before_step(optimizer)
            optimizer.step()
            if schedule is not None and schedule.client_steps_scheduler(opt, step):
                opt.scheduler.step()
            call_hook(task, "on_train_batch_end", out, batch, batch_idx)
            loss_sum += loss.detach()
            for h in hooks:
                h.after_step(step)
            step += 1
        call_hook(task, "on_train_epoch_end")
    call_hook(task, "on_train_end")
    return loss_sum, logs.compute()


def input_conversion(fabric: Any) -> Callable[[Any], Any]:
    """What a batch goes through before a step: with ``bf16-true`` / ``16-true`` its float
    tensors take the weights' dtype, as Fabric's wrapped module does (mixed precision
    autocasts instead, so its batches stay as they are)."""
    from lightning.fabric.plugins.precision import HalfPrecision

    precision = fabric.strategy.precision if fabric is not None else None
    return precision.convert_input if isinstance(precision, HalfPrecision) else _same


def _same(batch: Any) -> Any:
    return batch
