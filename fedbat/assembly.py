"""Building a run's parts from its config, once: the Fabric, the task (on its device and in
its precision), the data split over clients, the wire plan, the compressors, the strategy
and the local-training settings (:class:`Components`). The in-job round, the Flower
ClientApp, ``fedbat.fit``, the tests and the benchmarks build them here, one way."""

from __future__ import annotations

import copy
import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any

import lightning as L
import torch
from lightning.fabric import Fabric
from omegaconf import DictConfig, OmegaConf

from fedbat.batchnorm import local_statistics
from fedbat.client import ClientData, ClientSetup, LocalTraining, input_conversion, probe_batch
from fedbat.clientstore import Template
from fedbat.compressors import Compressor, TensorSpec, build_pair, wire_plan
from fedbat.compressors.plan import frozen_specs, module_types
from fedbat.config import run_strategy
from fedbat.contract import probe_training_step
from fedbat.datamodules import FederatedDataModule
from fedbat.datamodules.dataset import from_datamodule
from fedbat.errors import ConfigError
from fedbat.models import build as build_model
from fedbat.models import check_fits
from fedbat.optimization import ServerSchedule
from fedbat.server import Server, ServerSettings
from fedbat.strategies import Strategy
from fedbat.task import ClassificationTask


@dataclass(kw_only=True)
class Components:
    """A run's parts, built once from its config by :func:`build_components`."""

    cfg: DictConfig
    fabric: Fabric
    data: ClientData
    task: L.LightningModule  # the worker module, placed; the server keeps its own copy
    schedule: ServerSchedule  # the learning-rate schedule (the server owns its state)
    plan: list[TensorSpec]
    uplink: Compressor
    downlink: Compressor
    strategy: Strategy  # set up on the task's parameters; the server's binds it to its own
    local: LocalTraining

    @functools.cached_property
    def setup(self) -> ClientSetup:
        """What every client's local training shares."""
        return ClientSetup(
            task=self.task,
            data=self.data,
            local=self.local,
            plan=self.plan,
            uplink=self.uplink,
            schedule=self.schedule,
            strategy=self.strategy,
            local_buffers=frozenset(local_statistics(self.cfg, self.task)),
        )

    @functools.cached_property
    def packet_plan(self) -> list[TensorSpec]:
        """What a packet holds in either direction: the plan and the strategy's tensors."""
        return self.plan + self.strategy.extra_plan(self.plan)

    @functools.cached_property
    def full_plan(self) -> list[TensorSpec]:
        """The model a client first receives: the packet plan and the frozen tensors."""
        return self.packet_plan + frozen_specs(self.task, self.plan)

    def state_template(self) -> Template:
        """What a client's stored state may hold (``fedbat/clientstate.py``): one fp32
        residual per compressed tensor of its packets when its link keeps error feedback,
        the uplink compressor's own state per compressed tensor, and the strategy's client
        state."""
        up, compressed = self.uplink, [s for s in self.packet_plan if s.compressed]
        memory = up.needs_memory
        out = {f"residual/{s.name}": (s.shape, torch.float32) for s in compressed if memory}
        for s in compressed:
            kept = up.state_plan(s.shape).items()
            out |= {f"compressor/{s.name}/{k}": (torch.Size(sh), dt) for k, (sh, dt) in kept}
        states = self.strategy.client_state_plan(self.plan)
        return out | {f"state/{s.name}": (s.shape, s.dtype) for s in states}

    def server(self) -> Server:
        """The server of this run, which takes the strategy over."""
        f = self.cfg.fed
        return Server(
            self.task,
            self.plan,
            self.uplink,
            self.downlink,
            self.strategy,
            ServerSettings(
                seed=self.cfg.seed,
                max_update_ratio=f.max_update_ratio,
                weight_batch_size=f.batch_size if f.weight_by == "batches" else None,
                num_clients=self.data.num_clients,
            ),
        )


def build_components(
    cfg: DictConfig,
    fabric: Fabric,
    task: L.LightningModule | None = None,
    data: ClientData | None = None,
) -> Components:
    """A run's parts from ``cfg``; ``task`` and ``data`` are a user's, built by their own
    script (``fedbat.fit``), when given. With several processes every rank starts from rank
    0's weights."""
    data = data if data is not None else build_datamodule(cfg)
    task = task if task is not None else build_task(cfg, data)
    if fabric.world_size > 1:  # a module built by the user's script: rank 0's weights
        task.load_state_dict(fabric.broadcast(task.state_dict(), src=0))
    task = place(task, fabric)
    schedule = ServerSchedule(copy.deepcopy(task))  # checks the contract too
    plan = build_plan(cfg, task, data, input_conversion(fabric))
    uplink, downlink = build_pair(OmegaConf.to_container(cfg.compressor, resolve=True))
    strategy = run_strategy(cfg, data.num_clients)
    travel = {s.name for s in plan}
    strategy.setup({n: p for n, p in task.named_parameters() if n in travel}, data.num_clients)
    f = cfg.fed
    local = LocalTraining(f.local_epochs, f.batch_size, cfg.seed, fabric.device, fabric)
    return Components(
        cfg=cfg,
        fabric=fabric,
        data=data,
        task=task,
        schedule=schedule,
        plan=plan,
        uplink=uplink,
        downlink=downlink,
        strategy=strategy,
        local=local,
    )


def build_fabric(cfg: DictConfig) -> Fabric:
    t = cfg.trainer
    strategy = t.strategy
    if strategy == "auto" and (t.devices not in (1, "1") or t.num_nodes > 1):
        strategy = "ddp"
    with warnings.catch_warnings():  # a local run on a cluster's login node is no mistake
        warnings.filterwarnings("ignore", message="The `srun` command is available")
        try:
            return Fabric(
                accelerator=t.accelerator,
                devices=t.devices,
                num_nodes=t.num_nodes,
                strategy=strategy,
                precision=t.precision,
            )
        except RuntimeError as err:  # e.g. SLURM's --ntasks, which Lightning does not read
            raise ConfigError(f"trainer: {' '.join(str(err).split())}") from None


def place(task: L.LightningModule, fabric: Fabric) -> L.LightningModule:
    """``task`` on this process's device, in the dtype of ``trainer.precision`` (``bf16-true``
    and ``16-true`` convert the weights, as Fabric does)."""
    return fabric.strategy.precision.convert_module(task.to(fabric.device))


def threads_per_process(cfg: DictConfig, fabric: Fabric) -> int:
    """``trainer.threads``, else the cores shared out over this node's processes: CPU
    processes that each spawn one thread per core fight over the cores and crawl."""
    if cfg.trainer.get("threads"):
        return int(cfg.trainer.threads)
    local = max(1, fabric.world_size // max(1, int(cfg.trainer.num_nodes)))
    return max(1, (os.cpu_count() or 1) // local) if local > 1 else torch.get_num_threads()


def build_task(cfg: DictConfig, dm: ClientData) -> L.LightningModule:
    """``task._target_`` (a user's LightningModule) when set; else the built-in task around
    ``model`` (a registry name, or ``model._target_``). Initialised from the run seed
    alone, identically on every rank."""
    torch.manual_seed(cfg.seed)
    if cfg.task.get("_target_"):
        return instantiate_target(cfg.task, "task")
    if not hasattr(dm, "input_shape"):  # a user's datamodule: shapes unknown to fedbat
        raise ConfigError(
            "datamodule._target_: the built-in classifier needs a registered dataset's input "
            "shape; give your LightningModule too (task._target_=...)"
        )
    params = {k: v for k, v in cfg.model.items() if k != "name"}
    if cfg.model.get("_target_"):
        model = instantiate_target(OmegaConf.create(params), "model")
    else:
        with warnings.catch_warnings():  # a model too big for the input says so just below
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            model = build_model(cfg.model.name, dm.input_shape, dm.num_classes, **params)
        check_fits(model, cfg.model.name, dm.input_shape)
    f = cfg.fed
    return ClassificationTask(model, dm.num_classes, f.lr, f.momentum, f.weight_decay)


def build_plan(
    cfg: DictConfig,
    task: torch.nn.Module,
    data: ClientData,
    convert: Callable[[Any], Any] = lambda batch: batch,
) -> list[TensorSpec]:
    """The wire plan of ``policy``: which of the task's tensors travel and which of those are
    compressed. Only what trains travels: parameters with gradients, and the buffers that a
    training step (on a copy, on :func:`probe_batch`) changes or ``policy.travel`` names;
    that step also refuses a ``training_step`` that cannot be trained, before any work.
    ``convert`` is the precision's input conversion (``bf16-true``: float tensors to bf16)."""
    p, batch = cfg.policy, probe_batch(data, cfg.fed.batch_size, _device(task))
    buffers = {n for n, _ in task.named_buffers()}
    changed = probe_training_step(task, convert(batch)) if batch is not None else buffers
    frozen = {n for n in buffers - changed if not any(fnmatch(n, t) for t in p.travel)}
    frozen |= local_statistics(cfg, task)  # they never leave the clients
    modules = module_types(p.modules)
    return wire_plan(task, p.min_numel, modules, list(p.include), list(p.exclude), frozen)


def _device(module: torch.nn.Module) -> torch.device:
    return next((t.device for t in module.state_dict().values()), torch.device("cpu"))


def describe_plan(plan: list[TensorSpec], task: torch.nn.Module) -> str | None:
    """The line a run starts with when some of its tensors are frozen (None when all travel).

    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 300), torch.nn.Linear(300, 2))
    >>> _ = net[0].requires_grad_(False)
    >>> describe_plan(wire_plan(net), net)
    'fedbat: 2 tensors travel (602 elements, 1 compressed); 2 frozen stay (1,500 elements: ...)'
    """
    frozen = frozen_specs(task, plan)
    if not frozen:
        return None
    moving = sum(s.numel for s in plan)
    return (
        f"fedbat: {len(plan)} tensors travel ({moving:,} elements, "
        f"{sum(s.compressed for s in plan)} compressed); {len(frozen)} frozen stay "
        f"({sum(s.numel for s in frozen):,} elements: requires_grad=False, buffers a step "
        "leaves alone, or fed.bn_stats=local; sent once, in the model a client first gets)"
    )


def build_datamodule(cfg: DictConfig, split: bool = True) -> ClientData:
    """``datamodule._target_`` (a user's LightningDataModule) split over clients lazily, or
    the built-in in-memory reader ``data.name``, split over clients unless ``split`` is
    false (the evaluation data of a server whose clients hold their own data)."""
    if cfg.datamodule.get("_target_"):
        return from_datamodule(instantiate_target(cfg.datamodule, "datamodule"), **split_args(cfg))
    d = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(d, dict)
    d = {k: v for k, v in d.items() if k not in ("label_fn", "client_key")}
    dm = FederatedDataModule(seed=cfg.seed, **d)  # type: ignore[arg-type]
    if not split:
        return FederatedDataModule.of(dm.read(), [])
    dm.setup()
    return dm


def split_args(cfg: DictConfig) -> dict[str, Any]:
    """How a user's dataset is split: the ``data`` keys, and ``data.label_fn`` /
    ``data.client_key`` as dotted paths of functions."""
    d = cfg.data
    out: dict[str, Any] = {"num_clients": d.num_clients, "partition_name": d.partition}
    out |= {"seed": cfg.seed, "alpha": d.alpha, "classes_per_client": d.classes_per_client}
    out["class_assignment"] = d.class_assignment
    for key in ("label_fn", "client_key"):
        if d.get(key):
            out[key] = resolve_function(f"data.{key}", d[key])
    return out


def instantiate_target(node: DictConfig, key: str) -> Any:
    """``hydra.utils.instantiate`` with a one-line error naming ``key._target_``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except InstantiationException as err:
        reason = " ".join(str(err).split())[:200]
        raise ConfigError(f"{key}._target_={node._target_!r}: {reason}") from None


def resolve_function(key: str, path: str) -> Any:
    from hydra.utils import get_method

    try:
        return get_method(path)
    except Exception as err:
        raise ConfigError(f"{key}={path!r}: not an importable function ({err})") from None
