"""Any map-style Dataset (or a LightningDataModule's) split over clients, lazily.

Nothing is materialised as tensors: a client is a list of sample indices, partitioned by
label (``iid``, ``dirichlet``, ``label_count``; labels from the dataset's ``targets`` or a
``label_fn(sample)``) or by a natural key (``client_key(sample)``: one client per distinct
key, as LEAF splits Shakespeare by speaker). A client's batches come from a DataLoader with
the user's own ``collate_fn``, ``num_workers`` and ``pin_memory``, so dict batches (token
ids, masks) work, in an order seeded by (seed, round, client).

>>> from torch.utils.data import TensorDataset
>>> ds = TensorDataset(torch.arange(20.0).reshape(10, 2), torch.arange(10) % 2)
>>> clients = DatasetClients(ds, ds, num_clients=2, label_fn=lambda s: int(s[1]))
>>> clients.num_clients, clients.client_size(0) + clients.client_size(1)
(2, 10)
>>> xb, yb = next(clients.client_batches(0, 4, torch.Generator().manual_seed(0), "cpu"))
>>> xb.shape
torch.Size([4, 2])
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.data import DataLoader, Dataset, Subset

from fedbat.datamodules.partition import partition
from fedbat.errors import ConfigError

LOADER_KEYS = ("collate_fn", "num_workers", "pin_memory", "persistent_workers")


def dataset_labels(dataset: Dataset, label_fn: Callable[[Any], int] | None) -> np.ndarray:
    """Labels without loading the data where the dataset keeps them (``targets``, through
    ``Subset``s); else ``label_fn`` applied to each sample once."""
    if label_fn is None:
        targets = _targets(dataset)
        if targets is None:
            raise ConfigError(
                f"data: {type(dataset).__name__} has no 'targets' to partition by label; "
                "give label_fn (sample -> label) or client_key (sample -> client)"
            )
        return targets
    return np.asarray([int(label_fn(dataset[i])) for i in range(len(dataset))], dtype=np.int64)  # type: ignore[arg-type]


def _targets(dataset: Dataset) -> np.ndarray | None:
    if isinstance(dataset, Subset):
        inner = _targets(dataset.dataset)
        return None if inner is None else inner[np.asarray(dataset.indices)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    return np.asarray(torch.as_tensor(targets), dtype=np.int64)


def keyed_clients(dataset: Dataset, client_key: Callable[[Any], Hashable]) -> list[np.ndarray]:
    """One client per distinct key, in sorted key order (deterministic on every rank)."""
    groups: dict[Hashable, list[int]] = {}
    for i in range(len(dataset)):  # type: ignore[arg-type]
        groups.setdefault(client_key(dataset[i]), []).append(i)
    return [np.asarray(groups[k], dtype=np.int64) for k in sorted(groups, key=repr)]


class DatasetClients:
    """The client view of a train and a test Dataset (see the module docstring)."""

    def __init__(
        self,
        train: Dataset,
        test: Dataset | DataLoader | None,
        num_clients: int = 10,
        partition_name: str = "iid",
        seed: int = 0,
        alpha: float = 0.3,
        classes_per_client: int = 3,
        class_assignment: str = "random",
        label_fn: Callable[[Any], int] | None = None,
        client_key: Callable[[Any], Hashable] | None = None,
        loader: dict[str, Any] | None = None,
        test_batch_size: int = 256,
        val: Dataset | DataLoader | None = None,
    ) -> None:
        self.train, self.test, self.val, self.loader = train, test, val, dict(loader or {})
        self.test_batch_size = test_batch_size
        if client_key is not None:
            parts = keyed_clients(train, client_key)
        else:
            if partition_name == "iid" and label_fn is None and _targets(train) is None:
                labels = np.zeros(len(train), dtype=np.int64)  # type: ignore[arg-type]  # unused
            else:
                labels = dataset_labels(train, label_fn)
            parts = partition(
                partition_name,
                labels,
                num_clients,
                seed,
                alpha=alpha,
                classes_per_client=classes_per_client,
                class_assignment=class_assignment,
            )
        self.client_indices = [torch.from_numpy(np.asarray(p, dtype=np.int64)) for p in parts]
        self.num_clients = len(self.client_indices)

    def client_size(self, client: int) -> int:
        return len(self.client_indices[client])

    def client_batches(
        self, client: int, batch_size: int, generator: torch.Generator, device: Any
    ) -> Iterator[Any]:
        """One epoch of the client's samples in a seeded order, through the user's loader
        settings, moved to ``device``."""
        idx = self.client_indices[client]
        order = idx[torch.randperm(len(idx), generator=generator)].tolist()
        loader = DataLoader(self.train, batch_size=batch_size, sampler=order, **self.loader)
        for batch in loader:
            yield move_data_to_device(batch, device)

    def test_batches(self, batch_size: int, device: Any) -> Iterator[Any] | None:
        return self._eval_batches(self.test, device)

    def val_batches(self, batch_size: int, device: Any) -> Iterator[Any] | None:
        return self._eval_batches(self.val, device)

    def _eval_batches(self, data: Dataset | DataLoader | None, device: Any) -> Iterator[Any] | None:
        """``data``'s batches on ``device`` (a DataLoader as given), or None without data."""
        if data is None:
            return None
        if isinstance(data, DataLoader):
            loader = data
        else:
            loader = DataLoader(data, batch_size=self.test_batch_size, **self.loader)
        return (move_data_to_device(batch, device) for batch in loader)


def from_datamodule(datamodule: Any, **kwargs: Any) -> DatasetClients:
    """A LightningDataModule's train set split over clients; its val and test loaders are
    the server's evaluation data. Its loader settings serve the clients' batches."""
    datamodule.prepare_data()
    datamodule.setup("fit")
    train_loader = datamodule.train_dataloader()
    loader = {k: getattr(train_loader, k) for k in LOADER_KEYS if hasattr(train_loader, k)}
    if not loader.get("num_workers"):
        loader.pop("persistent_workers", None)
    import lightning as L

    loaders = {}
    for stage, method in (("test", "test_dataloader"), ("validate", "val_dataloader")):
        if getattr(type(datamodule), method, None) is not getattr(L.LightningDataModule, method):
            datamodule.setup(stage)
            loaders[stage] = getattr(datamodule, method)()
    return DatasetClients(
        train_loader.dataset,
        loaders.get("test"),
        loader=loader,
        val=loaders.get("validate"),
        **kwargs,
    )
