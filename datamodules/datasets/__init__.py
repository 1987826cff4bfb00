"""Dataset readers: each returns a ``TensorDataset``-like pair of tensors per split.

Readers read files that are already on disk (no download at run time unless torchvision is
installed and ``data.download=true``) and keep the whole dataset in memory as normalised
float tensors, so that a client's batch is one indexing operation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedbat.errors import ConfigError


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


Reader = Callable[..., Splits]
READERS: dict[str, Reader] = {}


def register(name: str) -> Callable[[Reader], Reader]:
    """Add a dataset reader under ``name`` (what ``data.name`` selects)."""

    def deco(fn: Reader) -> Reader:
        READERS[name] = fn
        return fn

    return deco


def load(name: str, **params: object) -> Splits:
    """Read the dataset ``name``; unknown names fail listing the available ones."""
    if name not in READERS:
        raise ConfigError(f"data.name={name!r}: unknown dataset; available: {', '.join(READERS)}")
    return READERS[name](**params)


def normalise(x: torch.Tensor, mean: float | list[float], std: float | list[float]) -> torch.Tensor:
    """uint8 NCHW images -> float32 standardised per channel."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    return ((x.float() / 255.0) - mean_t) / std_t


from datamodules.datasets import cifar, digits, fmnist, svhn, synthetic  # noqa: E402,F401
