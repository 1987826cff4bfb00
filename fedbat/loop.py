"""The federated loop on Lightning Fabric: one round as docs/architecture.md ("One round")
describes it.

Every process runs the same deterministic server logic; rank r trains its share of the
sampled clients. With one process this is plain sequential simulation.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from lightning.fabric import Fabric
from omegaconf import DictConfig, OmegaConf

from fedbat import checkpoint, clientstore, exchange, rundir, slurm
from fedbat.accounting import BitCounter
from fedbat.client import ClientData, ClientResult, LocalTraining, input_conversion, train_client
from fedbat.clientstore import ClientStore
from fedbat.compressors import ErrorFeedback, TensorSpec, build_pair, wire_plan
from fedbat.compressors.packet import frozen_specs, module_types
from fedbat.config import cap_rounds, check_resumable, validate
from fedbat.contract import ServerSchedule, evaluate, evaluation_plan, probe_training_step
from fedbat.datamodules import FederatedDataModule
from fedbat.datamodules.dataset import from_datamodule
from fedbat.downlink import Delivery, Downlink, encode_full
from fedbat.errors import CheckpointError, ConfigError, RunDirError
from fedbat.loggers import build_loggers, close_loggers, is_wandb, log_artifacts
from fedbat.models import build as build_model
from fedbat.models import check_fits
from fedbat.network import Network
from fedbat.progress import RoundProgress
from fedbat.rundir import RunDirLock
from fedbat.seeding import sample_clients
from fedbat.server import Server
from fedbat.strategies import build as build_strategy
from fedbat.task import ClassificationTask


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
    training step (on a copy, on client 0's first batch) changes or ``policy.travel`` names;
    that step also refuses a ``training_step`` that cannot be trained, before any work.
    ``convert`` is the precision's input conversion (``bf16-true``: float tensors to bf16)."""
    p = cfg.policy
    batches = data.client_batches(0, cfg.fed.batch_size, torch.Generator(), _device(task))
    batch = next(map(convert, batches), None)
    buffers = {n for n, _ in task.named_buffers()}
    changed = probe_training_step(task, batch) if batch is not None else buffers
    frozen = {n for n in buffers - changed if not any(fnmatch(n, t) for t in p.travel)}
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
        f"({sum(s.numel for s in frozen):,} elements: requires_grad=False, or buffers a "
        "training step leaves alone; sent once, in the model a client first receives)"
    )


def build_datamodule(cfg: DictConfig) -> ClientData:
    """``datamodule._target_`` (a user's LightningDataModule) split over clients lazily, or
    the built-in in-memory reader ``data.name``."""
    if cfg.datamodule.get("_target_"):
        return from_datamodule(instantiate_target(cfg.datamodule, "datamodule"), **split_args(cfg))
    d = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(d, dict)
    d = {k: v for k, v in d.items() if k not in ("label_fn", "client_key")}
    dm = FederatedDataModule(seed=cfg.seed, **d)  # type: ignore[arg-type]
    dm.setup()
    return dm


def split_args(cfg: DictConfig) -> dict[str, Any]:
    """How a user's dataset is split: the ``data`` keys, and ``data.label_fn`` /
    ``data.client_key`` as dotted paths of functions."""
    d = cfg.data
    out: dict[str, Any] = {
        "num_clients": d.num_clients,
        "partition_name": d.partition,
        "seed": cfg.seed,
        "alpha": d.alpha,
        "classes_per_client": d.classes_per_client,
        "class_assignment": d.class_assignment,
    }
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


class Federation:
    """What a run holds between rounds, and one round (docs/architecture.md, "One round",
    steps 1-8)."""

    def __init__(
        self,
        cfg: DictConfig,
        fabric: Fabric,
        task: L.LightningModule | None = None,
        data: ClientData | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.cfg, self.fabric, f = cfg, fabric, cfg.fed
        self.transport = transport if transport is not None else InJob()
        self.dm = data if data is not None else build_datamodule(cfg)
        if self.dm.num_clients < f.clients_per_round:
            raise ConfigError(
                f"fed.clients_per_round={f.clients_per_round}: the data has only "
                f"{self.dm.num_clients} clients"
            )
        self.task = task if task is not None else build_task(cfg, self.dm)
        if fabric.world_size > 1:  # a module built by the user's script: rank 0's weights
            self.task.load_state_dict(fabric.broadcast(self.task.state_dict(), src=0))
        self.task = place(self.task, fabric)
        self.schedule = ServerSchedule(copy.deepcopy(self.task))  # checks the contract too
        self.plan = build_plan(cfg, self.task, self.dm, input_conversion(fabric))
        self.uplink, downlink = build_pair(OmegaConf.to_container(cfg.compressor, resolve=True))
        self.server = Server(
            self.task,
            self.plan,
            self.uplink,
            downlink,
            build_strategy(OmegaConf.to_container(cfg.strategy, resolve=True)),
            cfg.seed,
            f.max_update_ratio,
            f.batch_size if f.weight_by == "batches" else None,
            self.dm.num_clients,
        )
        held = self.server.held | self.server.held_extra
        self.downlink = Downlink(self.dm.num_clients, encode_full(held, self.server.full_plan))
        self.error_feedback = self.uplink.error_feedback and not self.uplink.lossless
        self.store = ClientStore(cfg.run_dir, self.dm.num_clients, self._state_template())
        self.bits = BitCounter()
        n = cfg.get("network") or {}
        self.network = (
            Network(n.uplink_mbps, n.downlink_mbps, n.latency_ms, n.spread, cfg.seed)
            if n.get("uplink_mbps") is not None
            else None
        )
        self.comm_s = 0.0  # cumulative simulated communication time
        self.history: list[dict[str, float]] = []
        self.monitor = str(cfg.get("monitor", "auto"))  # 'auto': resolved at the first evaluation
        self.local = LocalTraining(f.local_epochs, f.batch_size, cfg.seed, fabric.device, fabric)

    def _state_template(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """What a client's stored state may hold: its residuals (one fp32 tensor per
        compressed tensor of its packets) and the strategy's client state."""
        residuals = [s for s in self.server.packet_plan if s.compressed and self.error_feedback]
        out = {f"residual/{s.name}": (s.shape, torch.float32) for s in residuals}
        states = self.server.strategy.client_state_plan(self.plan)
        return out | {f"state/{s.name}": (s.shape, s.dtype) for s in states}

    def play_round(self, r: int) -> dict[str, float]:
        """Sample, send each client what it missed, train, aggregate, broadcast, count."""
        cfg, t0 = self.cfg, time.perf_counter()
        clients = sample_clients(cfg.seed, r, self.dm.num_clients, cfg.fed.clients_per_round)
        sent_down = self.downlink.deliver(clients, r)
        results = self.transport.train(self, sent_down, r)
        t_trained = time.perf_counter()
        resets = {res.client: res.reset for res in results if res.reset}
        self.store.forget(list(resets))
        self.store.advance([res.client for res in results if res.stored], r)
        for client, why in resets.items():
            self.fabric.print(f"round {r + 1}: client {client}: state reset, {why}")
        agg = self.server.aggregate(results, clients)
        lr = self.schedule.lr
        self.schedule.end_round(max(self.local.steps(self.dm.client_size(c)) for c in clients))
        t_down = time.perf_counter()
        broadcast = self.server.broadcast(r)
        self.downlink.record(r, broadcast)
        compress_s = sum(res.compress_s for res in results) + time.perf_counter() - t_down
        for client, why in agg.rejected.items():
            self.fabric.print(f"round {r + 1}: rejected client {client}: {why}")
        metrics: dict[str, float] = {"round": r + 1, "train/loss": agg.train_loss}
        metrics |= self.bits.add_round(results, sent_down, self.plan)
        if self.network is not None:
            up = {res.client: 8 * len(res.data) for res in results}
            down = {d.client: d.bits for d in sent_down}
            comm = self.network.round_seconds(up, down)
            self.comm_s += comm
            metrics |= {"sim/comm_s": comm, "sim/comm_cum_s": self.comm_s}
        return (
            metrics
            | {
                "time/round_s": time.perf_counter() - t0,
                "time/train_s": t_trained - t0,  # the clients, and the exchange of results
                "time/server_s": time.perf_counter() - t_trained,  # aggregate to broadcast
                "time/compress_s": compress_s,
                "clients/accepted": len(agg.accepted),
                "clients/rejected": len(agg.rejected),
                "clients/state_reset": len(resets),
            }
            | {f"fedbat/{k}": v for k, v in agg.stats.items()}
            | agg.logs
            | self.transport.round_metrics()
            | ({"train/lr": lr} if lr is not None else {})
        )

    def train_client(self, client: int, r: int) -> ClientResult:
        """Train ``client`` in this process from the weights it holds (``w_hat``) and its
        own state, which it writes back to the store: results travel without it."""
        kept = self.store.get(client)
        residuals = {f"{client}/{k}": v for k, v in exchange.under(kept, "residual/").items()}
        res = train_client(
            self.task,
            self.server.held,
            self.dm,
            client,
            r,
            self.local,
            self.plan,
            self.uplink,
            ErrorFeedback(residuals) if self.error_feedback else None,
            self.schedule,
            self.server.strategy,
            self.server.held_extra,
            exchange.under(kept, "state/"),
        )
        mine = {f"residual/{k.split('/', 1)[1]}": v for k, v in res.residuals.items()}
        mine |= {f"state/{k}": v for k, v in res.state.items()}
        if res.ok and mine:
            self.store.put(client, r, mine)
            res.stored = True
        res.residuals, res.state = {}, {}
        res.reset = self.store.take_resets().get(client, "")
        return res

    def _migrate(
        self, r: int, residuals: dict[str, torch.Tensor], states: dict[str, torch.Tensor]
    ) -> None:
        by_client: dict[int, dict[str, torch.Tensor]] = {}
        for part, flat in (("residual", residuals), ("state", states)):
            for key, v in flat.items():
                client, _, name = key.partition("/")
                by_client.setdefault(int(client), {})[f"{part}/{name}"] = v
        for client, tensors in by_client.items():
            self.store.put(client, r, tensors)
        self.store.advance(list(by_client), r)

    def evaluate(self) -> dict[str, float]:
        """The global model's validation then test metrics; ``monitor=auto`` becomes the
        first key its validation logged, else its first test key."""
        self.task.load_state_dict(self.server.global_state())
        device = self.fabric.device
        val = getattr(self.dm, "val_batches", None)
        out: dict[str, float] = {}
        plan = evaluation_plan(
            self.task, val(1024, device) if val else None, self.dm.test_batches(1024, device)
        )
        convert = input_conversion(self.fabric)
        for stage, batches in plan:
            logged = evaluate(self.task, stage, map(convert, batches))
            if self.monitor == "auto" and logged:
                self.monitor = next(iter(logged))
            out |= logged
        return out

    def state_dict(self, completed: int, wandb_id: str | None) -> dict[str, Any]:
        return {
            "round": completed,
            "server": self.server.state_dict(),
            "clients": self.store.state_dict(),
            "downlink": self.downlink.state_dict(),
            "bits": self.bits.state_dict(),
            "schedule": self.schedule.state_dict(),
            "history": self.history,
            "monitor": self.monitor,
            "wandb_id": wandb_id or "",
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.server.load_state_dict(state["server"])
        if "clients" in state:
            self.store.load_state_dict(state["clients"])
        else:  # a checkpoint from before the store: its states move into the store
            self._migrate(state["round"] - 1, state["uplink_memory"], state["client_states"])
        if "downlink" in state:  # older checkpoints: every client is sent the full model
            self.downlink.load_state_dict(state["downlink"])
        if not self.transport.clients_persist:
            self.downlink.version.fill_(-1)
        self.bits = BitCounter(**state["bits"])
        self.schedule.load_state_dict(state.get("schedule", {}))
        self.history = state["history"]
        if self.monitor == "auto":
            self.monitor = state.get("monitor", "auto")
        self.comm_s = self.history[-1].get("sim/comm_cum_s", 0.0) if self.history else 0.0


class Transport(Protocol):
    """How a round's sampled clients are trained and their results reach the server: in
    this job (:class:`InJob`) or over a network (``fedbat.integrations.flower``). The same
    packets travel either way."""

    clients_persist: bool  # whether clients keep what they hold across a resume

    def train(self, fed: Federation, sent_down: list[Delivery], r: int) -> list[ClientResult]:
        """The results of the clients of ``sent_down``, sorted by client id, on every rank."""
        ...

    def round_metrics(self) -> dict[str, float]:
        """What the transport measured in the last round (e.g. bytes on its wire)."""
        ...


class InJob:
    """Rank r trains its share of the clients from ``w_hat`` (what each holds after its
    delivery); the results are all-gathered."""

    clients_persist = True

    def train(self, fed: Federation, sent_down: list[Delivery], r: int) -> list[ClientResult]:
        fabric = fed.fabric
        mine = sent_down[fabric.global_rank :: fabric.world_size]
        return exchange.gather(fabric, [fed.train_client(d.client, r) for d in mine])

    def round_metrics(self) -> dict[str, float]:
        return {}


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
        summary = _train(cfg, fabric, run_dir, task, data, transport, slurm.STOP)
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


def _train(
    cfg: DictConfig,
    fabric: Fabric,
    run_dir: Path,
    task: L.LightningModule | None,
    data: ClientData | None,
    transport: Transport | None,
    stop: slurm.StopRequest,
) -> dict[str, Any]:
    f = cfg.fed
    resumed = resume_state(cfg, run_dir)
    fed = Federation(cfg, fabric, task, data, transport)
    if line := describe_plan(fed.plan, fed.task):
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
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        loggers = build_loggers(cfg, run_dir, wandb_id, fed.history) if is_zero else []
    wandb_id = next((lg.version for lg in loggers if is_wandb(lg)), None)
    progress = RoundProgress(f.rounds, start, enabled=is_zero and cfg.progress)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    status = "failed"
    try:
        for r in range(start, f.rounds):
            metrics = fed.play_round(r)
            last = r + 1 == f.rounds
            if is_zero and ((r + 1) % f.eval_every == 0 or last):
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
                (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
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


LOWER_IS_BETTER = ("loss", "error", "err", "ppl", "perplexity", "mse", "mae", "rmse")


def monitor_lower(key: str, mode: str) -> bool:
    """Whether lower values of ``key`` are better: ``monitor_mode``, or with ``auto`` a key
    naming a loss, error or perplexity (``val_loss``, ``test/ppl``).

    >>> monitor_lower("test/acc", "auto"), monitor_lower("val_loss", "auto")
    (False, True)
    """
    if mode != "auto":
        return mode == "min"
    words = re.split(r"[^a-z]+", key.lower())
    return any(w in LOWER_IS_BETTER for w in words)


def unlogged_monitor(history: list[dict[str, float]], key: str) -> str:
    """The line a run ends with when its ``monitor`` was never logged.

    >>> unlogged_monitor([{"round": 1, "bits/uplink": 8, "val_acc": 0.9}], "test/acc")
    "fedbat: monitor='test/acc' was never logged, ...; logged: val_acc (set monitor=<one of them>)"
    """
    accounting = ("bits/", "time/", "compression/", "clients/", "sim/", "fedbat/", "flower/")
    logged = sorted({k for h in history for k in h if not k.startswith(accounting)} - {"round"})
    return (
        f"fedbat: monitor={key!r} was never logged, so the summary has no final or best "
        f"value; logged: {', '.join(logged) or 'nothing'} (set monitor=<one of them>)"
    )


def summarise(
    history: list[dict[str, float]], cfg: DictConfig, monitor: str | None = None
) -> dict[str, Any]:
    """Best/final value of the monitored metric (``monitor``, as resolved from ``auto``;
    best is the max, or the min with ``monitor_mode=min``, and ``auto`` is min for a loss,
    error or perplexity), total bits, and the uplink bits at which it first reached
    ``target_acc`` (None when it never did)."""
    key = monitor or cfg.get("monitor", "auto")
    key = "test/acc" if key == "auto" else key  # nothing was evaluated
    lower = monitor_lower(key, cfg.get("monitor_mode", "auto"))
    evals = [h for h in history if key in h]
    target = cfg.get("target_acc")

    def reached(value: float) -> bool:
        return value <= target if lower else value >= target

    hit = next(
        (h["bits/uplink_cum"] for h in evals if target is not None and reached(h[key])), None
    )
    last = history[-1] if history else {}
    best = (min if lower else max)((h[key] for h in evals), default=None)
    return {
        "rounds": len(history),
        "monitor": key,
        "final_acc": evals[-1][key] if evals else None,
        "best_acc": best,
        "bits_uplink_total": last.get("bits/uplink_cum", 0),
        "bits_downlink_total": last.get("bits/downlink_cum", 0),
        "target_acc": target,
        "bits_uplink_to_target": hit,
    }
