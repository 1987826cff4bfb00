"""The LightningDataModule that knows the client partition and serves client batches."""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedbat.datamodules.datasets import Splits, load
from fedbat.datamodules.partition import partition


class FederatedDataModule(L.LightningDataModule):
    """A dataset held as tensors and split over ``num_clients`` clients.

    Batches are cut by indexing the in-memory tensors (no DataLoader workers): for small
    models the per-batch overhead of a DataLoader would dominate local training.

    >>> dm = FederatedDataModule("synthetic", num_clients=4, partition="iid", seed=0)
    >>> dm.setup()
    >>> dm.client_size(0), dm.num_classes, dm.input_shape
    (500, 10, (1, 8, 8))
    """

    def __init__(
        self,
        name: str,
        num_clients: int,
        partition: str = "iid",
        seed: int = 0,
        root: str | None = None,
        alpha: float = 0.3,
        classes_per_client: int = 3,
        class_assignment: str = "random",
        download: bool = False,
        **dataset_params: object,
    ) -> None:
        super().__init__()
        self.name, self.num_clients, self.partition_name = name, num_clients, partition
        self.seed, self.alpha, self.classes_per_client = seed, alpha, classes_per_client
        self.class_assignment = class_assignment
        self.dataset_params = {"root": root, "download": download, **dataset_params}
        self.splits: Splits | None = None
        self.client_indices: list[torch.Tensor] = []

    @classmethod
    def of(cls, splits: Splits, client_indices: list[torch.Tensor]) -> FederatedDataModule:
        """``splits`` already in memory, split as ``client_indices`` says (a Flower node's own
        data: one client holding its whole training set, in its stored order)."""
        dm = cls("tensors", num_clients=len(client_indices))
        dm.splits, dm.client_indices = splits, client_indices
        return dm

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        self.splits = self.read()
        parts = partition(
            self.partition_name,
            self.splits.y_train.numpy(),
            self.num_clients,
            self.seed,
            alpha=self.alpha,
            classes_per_client=self.classes_per_client,
            class_assignment=self.class_assignment,
        )
        self.client_indices = [torch.from_numpy(np.asarray(p, dtype=np.int64)) for p in parts]

    def read(self) -> Splits:
        """The dataset's splits, read from disk and not split over clients."""
        return load(self.name, **self.dataset_params)

    @property
    def data(self) -> Splits:
        if self.splits is None:
            raise RuntimeError("call setup() first")
        return self.splits

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.data.input_shape

    def client_size(self, client: int) -> int:
        return len(self.client_indices[client])

    def client_batches(
        self, client: int, batch_size: int, generator: torch.Generator, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of the client's data in a seeded random order."""
        idx = self.client_indices[client]
        order = idx[torch.randperm(len(idx), generator=generator)]
        x, y = self.data.x_train, self.data.y_train
        for start in range(0, len(order), batch_size):
            sel = order[start : start + batch_size]
            xb = x[sel]
            if self.data.augment:
                xb = crop_flip(xb, generator)
            yield xb.to(device, non_blocking=True), y[sel].to(device, non_blocking=True)

    def test_batches(
        self, batch_size: int, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.data.x_test, self.data.y_test
        for start in range(0, len(y), batch_size):
            yield x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)

    def client_dataloader(self, client: int, batch_size: int) -> DataLoader:
        """A standard DataLoader over one client's data, for code that wants one."""
        idx = self.client_indices[client]
        ds = TensorDataset(self.data.x_train[idx], self.data.y_train[idx])
        return DataLoader(ds, batch_size=batch_size, shuffle=True)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.data.x_test, self.data.y_test), batch_size=1024)


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip per image, on a whole batch."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator)
    rows = (torch.arange(h).view(1, h, 1) + dy).expand(n, h, w)
    cols = (torch.arange(w).view(1, 1, w) + dx).expand(n, h, w)
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip.view(n, 1, 1), cols.flip(-1), cols)
    batch = torch.arange(n).view(n, 1, 1).expand(n, h, w)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()
