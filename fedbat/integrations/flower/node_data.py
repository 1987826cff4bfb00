"""Each node's own data, and what the server knows of it.

A SuperNode's node config may name the data it trains on: ``data-root`` (a folder of the
``tensors`` format, ``train.safetensors``) or ``datamodule`` (a LightningDataModule's
dotted path) with ``datamodule-args`` (a JSON object of its arguments). The node then reads
only that, as a device reads only its own data, and declares its sample count when the
server first asks which client it serves. The server (run config ``node-data = true``)
reads only its evaluation data and weighs each client by the count its node declared:
a count it cannot check, as in any federated deployment, but one it holds the node to.
Without either key a node keeps the partition ``partition-id`` of the configured dataset
(a local test's mode).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fedbat.assembly import build_datamodule, instantiate_target
from fedbat.client import ClientData
from fedbat.datamodules import FederatedDataModule
from fedbat.datamodules.dataset import from_datamodule
from fedbat.datamodules.datasets import load
from fedbat.datamodules.datasets.tensors import write_split
from fedbat.devices import clock_enabled
from fedbat.errors import ConfigError

MAX_SAMPLES = 2**31 - 1  # a declared count beyond this is no node's data


class NodeData:
    """A node's own training data as the data of a run of ``num_clients`` clients, of
    which it serves ``client`` (its ``partition-id``) alone."""

    def __init__(self, local: ClientData, client: int, num_clients: int) -> None:
        self.local, self.probe_client, self.num_clients = local, client, num_clients

    def client_size(self, client: int) -> int:
        return self.local.client_size(self._own(client))

    def client_batches(
        self, client: int, batch_size: int, generator: torch.Generator, device: Any
    ) -> Iterator[Any]:
        return self.local.client_batches(self._own(client), batch_size, generator, device)

    def test_batches(self, batch_size: int, device: Any) -> None:
        return None  # a node evaluates nothing: the server does

    def __getattr__(self, name: str) -> Any:  # input_shape, num_classes: the task needs them
        return getattr(self.__dict__["local"], name)

    def _own(self, client: int) -> int:
        if client != self.probe_client:
            raise ValueError(f"client {client}'s data is not on this node ({self.probe_client})")
        return 0


class NodeSizes:
    """The server's data when its clients hold their own: its evaluation data, and each
    client's sample count as its node declared it (``sizes``, filled as nodes join; 0 for
    a client whose node has not)."""

    def __init__(self, evaluation: ClientData, num_clients: int, sizes: Mapping[int, int]) -> None:
        self.evaluation, self.num_clients, self.sizes = evaluation, num_clients, sizes

    def client_size(self, client: int) -> int:
        return self.sizes.get(client, 0)

    def client_batches(self, client: int, *args: Any) -> Iterator[Any]:
        return iter(())  # on the node's disk, not here

    def __getattr__(self, name: str) -> Any:  # test_batches, val_batches, shapes
        return getattr(self.__dict__["evaluation"], name)


def node_data(node_config: Mapping[str, Any], cfg: DictConfig) -> NodeData | None:
    """The data a node's config names (None: none, the partition-id mode)."""
    root = str(node_config.get("data-root", ""))
    target = str(node_config.get("datamodule", ""))
    if root and target:
        raise ConfigError("node config: give data-root or datamodule, not both")
    if root:
        splits = load("tensors", root=root)
        if not len(splits.y_train):
            raise ConfigError(f"node config data-root={root}: holds no train.safetensors")
        local: ClientData = FederatedDataModule.of(splits, [torch.arange(len(splits.y_train))])
    elif target:
        try:
            args = json.loads(str(node_config.get("datamodule-args", "")) or "{}")
        except json.JSONDecodeError:
            args = None
        if not isinstance(args, dict):
            raise ConfigError("node config datamodule-args: must be a JSON object")
        module = instantiate_target(OmegaConf.create({"_target_": target, **args}), "datamodule")
        local = from_datamodule(module, num_clients=1, seed=cfg.seed)
    else:
        return None
    return NodeData(local, int(node_config["partition-id"]), int(cfg.data.num_clients))


def server_data(cfg: DictConfig, sizes: Mapping[int, int]) -> NodeSizes:
    """The server's view of nodes that hold their own data: ``data`` read, not split. What
    needs the clients' data on the server, or their counts before they join, is refused."""
    if cfg.fed.get("bn_stats") == "recompute":
        raise ConfigError(
            "fed.bn_stats=recompute: the server recomputes statistics on its clients' data, "
            "which stays on the nodes here; use average or local"
        )
    if clock_enabled(cfg):
        raise ConfigError(
            "system: the simulated clock needs every client's sample count before the run; "
            "the nodes declare theirs as they join (leave system.* unset)"
        )
    return NodeSizes(build_datamodule(cfg, split=False), int(cfg.data.num_clients), sizes)


def declared(count: object) -> int | None:
    """A node's declared sample count, when it is one."""
    ok = isinstance(count, int) and not isinstance(count, bool) and 1 <= count <= MAX_SAMPLES
    return count if ok else None  # type: ignore[return-value]


def write_folders(cfg: DictConfig, out: Path) -> list[Path]:
    """The job's data as its nodes and server would hold it: ``out/node-<i>`` with client
    i's training samples (in the order ``fedbat train`` holds them) and ``out/server`` with
    the evaluation data alone, each in the ``tensors`` format; nothing is overwritten."""
    taken = [p for p in (out / "server", *(out / f"node-{i}" for i in range(cfg.data.num_clients)))
             if p.exists()]  # fmt: skip
    if taken:
        raise ConfigError(f"--write-node-data={out}: {taken[0]} exists; name a new folder")
    dm = build_datamodule(cfg)
    if not isinstance(dm, FederatedDataModule):
        raise ConfigError("datamodule._target_: only a built-in dataset (data.name) is written")
    s, k = dm.data, dm.num_classes
    written = [write_split(out / "server", "test", s.x_test, s.y_test, k)]
    for i, idx in enumerate(dm.client_indices):
        x, y = s.x_train[idx], s.y_train[idx]
        written.append(write_split(out / f"node-{i}", "train", x, y, k, augment=s.augment))
    return written
