"""Validation of a whole run config before any work starts, and the resume compatibility
check. Every failure is a ConfigError naming the key, the bad value and what is allowed."""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from fedbat.batchnorm import RULES
from fedbat.compressors import build_pair
from fedbat.compressors.plan import module_types
from fedbat.datamodules import PARTITIONERS, READERS
from fedbat.devices import build_devices, clock_enabled
from fedbat.errors import ConfigError, check_range
from fedbat.hooks import check_transform_point
from fedbat.models import MODELS, check_params
from fedbat.strategies import Strategy
from fedbat.strategies import build as build_strategy
from fedbat.strategies.privacy import private

BIG = 10**9
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
# fedbat moves packets itself and never wraps the model: it needs processes and a process
# group, which Fabric's "ddp" gives (on 1 device "auto" needs none)
STRATEGIES = ("auto", "ddp")
# The one list of keys that never change what a run computes (where it runs, how it is
# watched, where it writes); prefixes cover their sub-keys. trainer.precision is not one.
RESULT_FREE = (
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.threads",
    "logger",
    "resume",
    "run_dir",
    "progress",
    "checkpoint",
    "hydra",
)
# ... and those that change only how long it runs or what its summary reports: a resumed
# run may change them, and a run dir is named without them
RESUME_FREE = (*RESULT_FREE, "fed.rounds", "target_acc", "monitor", "monitor_mode")
# keys added since checkpoints were first written, and the value that behaves as before
ADDED = {"fed.bn_stats": "average", "fed.bn_clients": 10}


def is_free(key: str, free: tuple[str, ...] = RESUME_FREE) -> bool:
    """Whether config ``key`` (or an override's key, ``+``/``~`` prefixes allowed) is one
    of ``free`` or below one.

    >>> is_free("logger.wandb.mode"), is_free("+fed.rounds"), is_free("trainer.precision")
    (True, True, False)
    """
    key = key.lstrip("+~").split("=", 1)[0]
    return any(key == f or key.startswith(f + ".") for f in free)


def run_name(overrides: Sequence[str]) -> str:
    """A run dir's name: its overrides, sorted, without the resume-free ones (so that raising
    ``fed.rounds`` resumes the same dir), as Hydra names its run dirs; ``default`` for none.

    >>> run_name(["fed.lr=0.1", "trainer.devices=2", "compressor=fedbat", "fed.rounds=9"])
    'compressor=fedbat,fed.lr=0.1'
    """
    return ",".join(sorted(o for o in overrides if not is_free(o))) or "default"


MAX_ROUNDS = "FEDBAT_MAX_ROUNDS"  # environment: cap every run's fed.rounds (smoke tests)


def cap_rounds(cfg: DictConfig) -> None:
    """``fed.rounds`` at most ``$FEDBAT_MAX_ROUNDS`` when set: any command, run for a round
    or two (the README's commands are tested so)."""
    cap = os.environ.get(MAX_ROUNDS)
    if not cap:
        return
    if not cap.isdigit() or int(cap) < 1:
        raise ConfigError(f"{MAX_ROUNDS}={cap!r}: must be an integer >= 1")
    if isinstance(cfg.fed.rounds, int) and cfg.fed.rounds > int(cap):
        cfg.fed.rounds = int(cap)


def _check_gpus(accelerator: str, devices: int | str) -> None:
    """GPUs asked for that this machine lacks fail here, in one line, not deep in Fabric."""
    from lightning.fabric.accelerators import CUDAAccelerator, MPSAccelerator

    kinds = {"cuda": CUDAAccelerator, "mps": MPSAccelerator}
    wanted = list(kinds) if accelerator == "gpu" else [accelerator]
    if not set(wanted) <= set(kinds):
        return  # cpu or auto: always runs
    have = max((kinds[k].auto_device_count() for k in wanted if kinds[k].is_available()), default=0)
    if have == 0:
        raise ConfigError(
            f"trainer.accelerator={accelerator!r}: no such device on this machine; "
            "use trainer.accelerator=cpu (or auto)"
        )
    if devices != "auto" and int(devices) > have:
        raise ConfigError(
            f"trainer.devices={devices}: this machine has {have} {accelerator} device(s)"
        )


def _choice(key: str, value: Any, allowed: Any) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(str, allowed))}")


# Sections whose keys are fedbat's own: a key they do not have (``+fed.roundz=3``) is a typo.
# The groups (data, model, compressor, strategy, privacy, logger) and task/datamodule take
# parameters.
CLOSED = ("fed", "policy", "trainer", "checkpoint", "network", "system")
OPEN = ("data", "model", "compressor", "strategy", "privacy", "logger", "hydra")


def _check_keys(cfg: DictConfig) -> None:
    base = OmegaConf.load(files("fedbat.configs") / "train.yaml")
    allowed = {"": set(base) - {"defaults", "hydra"} | set(OPEN)}
    allowed |= {section: set(base[section]) for section in CLOSED}
    for section, keys in allowed.items():
        node = cfg[section] if section else cfg
        if not isinstance(node, DictConfig):
            raise ConfigError(f"{section}={node!r}: must be a mapping of {', '.join(keys)}")
        if extra := sorted(set(node) - keys):
            key = f"{section}.{extra[0]}" if section else extra[0]
            raise ConfigError(
                f"{key}={OmegaConf.select(cfg, key)!r}: no such key; "
                f"{section or 'the config'} has: {', '.join(sorted(keys - {'hydra'}))}"
            )


TIMES = "set system.compute_s_per_sample, system.trace or network.uplink_mbps/downlink_mbps"


def _check_system(cfg: DictConfig) -> None:
    """``system.*``: ranges, the trace and availability files (read once, here, so that a bad
    row fails before any work), and a clock for the round policies to act on."""
    s = cfg.system
    check_range("system.compute_s_per_sample", s.compute_s_per_sample, 0.0, 1e6)
    check_range("system.compute_spread", s.compute_spread, 0.0, 5.0)
    check_range("system.over_select", s.over_select, 1.0, 100.0)
    if s.deadline_s is not None:
        check_range("system.deadline_s", s.deadline_s, 0.0, 1e12, low_open=True)
    timed = clock_enabled(cfg)
    for key, off in (("deadline_s", None), ("availability", None), ("over_select", 1.0)):
        if s[key] != off and not timed:
            raise ConfigError(f"system.{key}={s[key]!r}: rounds have no time to act on; {TIMES}")
    if s.trace or s.availability:
        build_devices(cfg, int(cfg.data.num_clients))


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first invalid value (names, ranges, types)."""
    _check_keys(cfg)
    d, f = cfg.data, cfg.fed
    if cfg.get("run_dir") is not None and not str(cfg.run_dir).strip():
        raise ConfigError(
            f"run_dir={cfg.run_dir!r}: must be a folder (or null, for "
            "runs/<data>_<model>_<compressor>/<overrides>)"
        )
    _choice("data.name", d.name, READERS)
    _choice("data.partition", d.partition, PARTITIONERS)
    if not cfg.model.get("_target_"):
        _choice("model.name", cfg.model.name, MODELS)
        check_params(cfg.model)
    _choice("monitor_mode", cfg.monitor_mode, ("auto", "max", "min"))
    check_range("seed", cfg.seed, 0, 2**32 - 1, integer=True)
    check_range("data.num_clients", d.num_clients, 1, 10**6, integer=True)
    check_range("data.alpha", d.alpha, 0.0, BIG, low_open=True)
    check_range("data.classes_per_client", d.classes_per_client, 1, 10**5, integer=True)
    check_range("fed.rounds", f.rounds, 1, BIG, integer=True)
    check_range("fed.clients_per_round", f.clients_per_round, 1, d.num_clients, integer=True)
    check_range("fed.local_epochs", f.local_epochs, 1, 10**4, integer=True)
    check_range("fed.batch_size", f.batch_size, 1, 10**6, integer=True)
    check_range("fed.lr", f.lr, 0.0, 100.0, low_open=True)
    check_range("fed.momentum", f.momentum, 0.0, 0.999)
    check_range("fed.weight_decay", f.weight_decay, 0.0, 1.0)
    check_range("fed.eval_every", f.eval_every, 1, BIG, integer=True)
    _choice("fed.weight_by", f.weight_by, ("samples", "batches"))
    _choice("fed.bn_stats", f.get("bn_stats", "average"), RULES)
    check_range("fed.bn_clients", f.get("bn_clients", 10), 1, BIG, integer=True)
    _choice("data.class_assignment", d.get("class_assignment", "random"), ("random", "authors"))
    if f.get("max_update_ratio") is not None:
        check_range("fed.max_update_ratio", f.max_update_ratio, 0.0, 1e30, low_open=True)
    check_range("policy.min_numel", cfg.policy.min_numel, 0, BIG, integer=True)
    for key in ("modules", "include", "exclude", "travel"):
        if not isinstance(cfg.policy[key], ListConfig | list):
            raise ConfigError(
                f"policy.{key}={cfg.policy[key]!r}: must be a list, e.g. policy.{key}=[Linear]"
            )
    module_types(cfg.policy.modules)
    check_range("checkpoint.every", cfg.checkpoint.every, 1, BIG, integer=True)
    net = cfg.get("network") or {}
    if (net.get("uplink_mbps") is None) != (net.get("downlink_mbps") is None):
        given = "uplink" if net.get("uplink_mbps") is not None else "downlink"
        raise ConfigError(f"network.{given}_mbps: set both network.uplink_mbps and downlink_mbps")
    for key in ("uplink_mbps", "downlink_mbps"):
        if net.get(key) is not None:
            check_range(f"network.{key}", net[key], 0.0, 1e9, low_open=True)
    check_range("network.latency_ms", net.get("latency_ms", 0.0), 0.0, 1e7)
    check_range("network.spread", net.get("spread", 0.0), 0.0, 5.0)
    _check_system(cfg)
    if cfg.get("target_acc") is not None:
        check_range("target_acc", cfg.target_acc, 0.0, 1.0)
    t = cfg.trainer
    _choice("trainer.precision", str(t.precision), PRECISIONS)
    _choice("trainer.accelerator", t.accelerator, ACCELERATORS)
    _choice("trainer.strategy", t.strategy, STRATEGIES)
    if t.devices != "auto":
        check_range("trainer.devices", t.devices, 1, 4096, integer=True)
    _check_gpus(t.accelerator, t.devices)
    check_range("trainer.num_nodes", t.num_nodes, 1, 10**5, integer=True)
    if t.get("threads") is not None:
        check_range("trainer.threads", t.threads, 1, 1024, integer=True)
    w = cfg.logger.get("wandb")
    if w and w.get("mode") is not None:
        _choice("logger.wandb.mode", w.mode, ("online", "offline", "disabled"))
    if (
        cfg.resume not in ("auto", False, None, "false", "never")
        and not Path(str(cfg.resume)).is_file()
    ):
        raise ConfigError(
            f"resume={cfg.resume!r}: no such checkpoint file (use auto, false or a path)"
        )
    uplink, _ = build_pair(OmegaConf.to_container(cfg.compressor, resolve=True))  # type: ignore[arg-type]
    strategy = run_strategy(cfg)
    check_transform_point(uplink, strategy)
    if strategy.asynchronous:
        _check_buffered(cfg)


def _check_buffered(cfg: DictConfig) -> None:
    """Buffered rounds run on the clock, with their own policy, among enough clients."""
    name, s = cfg.strategy.name, cfg.system
    if not clock_enabled(cfg):
        raise ConfigError(f"strategy={name}: asynchronous rounds need client times; {TIMES}")
    if s.deadline_s is not None or s.over_select != 1.0:
        key = "deadline_s" if s.deadline_s is not None else "over_select"
        raise ConfigError(
            f"system.{key}={s[key]!r}: a synchronous round policy; strategy={name} takes "
            "the first strategy.buffer_size arrivals instead"
        )
    check_range(
        "strategy.buffer_size", cfg.strategy.buffer_size, 1, cfg.data.num_clients, integer=True
    )


def run_strategy(cfg: DictConfig, num_clients: int | None = None) -> Strategy:
    """The run's server rule: ``strategy`` (with its wrappers) under ``privacy``, for a
    population of ``num_clients`` (default: ``data.num_clients``)."""
    strategy = build_strategy(OmegaConf.to_container(cfg.strategy, resolve=True))  # type: ignore[arg-type]
    return private(
        strategy,
        OmegaConf.to_container(cfg.get("privacy") or {"name": "none"}, resolve=True),  # type: ignore[arg-type]
        seed=cfg.seed,
        num_clients=num_clients or cfg.data.num_clients,
        per_round=cfg.fed.clients_per_round,
    )


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out |= _flatten(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: node}


def check_resumable(cfg: DictConfig, saved_yaml: str, path: Path) -> None:
    """A checkpoint resumes only the run that wrote it: every result-affecting key agrees."""
    now = _flatten(OmegaConf.to_container(cfg, resolve=True))
    before = _flatten(OmegaConf.to_container(OmegaConf.create(saved_yaml), resolve=True))
    # a group's ``name`` first: another model is named as such, not by its first parameter
    for key in sorted(set(now) | set(before), key=lambda k: (not k.endswith(".name"), k)):
        if is_free(key):
            continue
        if key not in before and now[key] in ([], ADDED.get(key, [])):  # added since, at
            continue  # the value that behaves as before
        if now.get(key) != before.get(key):
            raise ConfigError(
                f"{key}={now.get(key)!r}: the checkpoint {path} was written with "
                f"{key}={before.get(key)!r}; use another run_dir, or resume=false to start over"
            )
