"""A seeded, learnable synthetic dataset of any shape and number of classes (for tests)."""

from __future__ import annotations

import torch

from fedbat.datamodules.datasets import Splits, register


@register("synthetic")
def load_synthetic(
    shape: tuple[int, ...] | list[int] = (1, 8, 8),
    num_classes: int = 10,
    train_size: int = 2000,
    test_size: int = 500,
    seed: int = 0,
    noise: float = 1.0,
    **_: object,
) -> Splits:
    """Class means ~ N(0, 1); samples = their class mean + N(0, noise^2)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(int(s) for s in shape)
    means = torch.randn((num_classes, *shape), generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(num_classes, (n,), generator=g)
        return means[y] + noise * torch.randn((n, *shape), generator=g), y

    x_train, y_train = draw(train_size)
    x_test, y_test = draw(test_size)
    return Splits(x_train, y_train, x_test, y_test, num_classes=num_classes)
