"""Dataset readers: each returns a ``TensorDataset``-like pair of tensors per split.

Readers read files that are already on disk (no download at run time unless torchvision is
installed and ``data.download=true``) and keep the whole dataset in memory as normalised
float tensors, so that a client's batch is one indexing operation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedbat.registry import Registry


@dataclass(frozen=True)
class Splits:
    """A dataset in memory: normalised images (N, C, H, W), int64 labels, and its facts."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    augment: bool = False  # random crop (pad 4) + horizontal flip during local training

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


READERS = Registry("data.name", "dataset")
register = READERS.register  # add a reader ``fn(**params) -> Splits`` under a data.name


def load(name: str, **params: object) -> Splits:
    """Read the dataset ``name``; unknown names fail listing the available ones."""
    return READERS.get(name)(**params)


def normalise(x: torch.Tensor, mean: float | list[float], std: float | list[float]) -> torch.Tensor:
    """uint8 NCHW images -> float32 standardised per channel."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    return ((x.float() / 255.0) - mean_t) / std_t


from fedbat.datamodules.datasets import cifar, digits, fmnist, svhn, synthetic, tensors  # noqa: E402,F401
