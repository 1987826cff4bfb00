"""Small models for the digits dataset and tests: an MLP and a two-layer CNN."""

from __future__ import annotations

import math

from torch import nn

from fedbat.models import register


@register("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 128) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


@register("cnn")
def cnn(input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * width, num_classes),
    )
