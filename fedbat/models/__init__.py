"""Model registry: ``model.name`` -> a builder taking the input shape and class count."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fedbat.errors import ConfigError

Builder = Callable[..., nn.Module]
MODELS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Add a model builder ``fn(input_shape, num_classes, **params)`` under ``name``."""

    def deco(fn: Builder) -> Builder:
        MODELS[name] = fn
        return fn

    return deco


def build(name: str, input_shape: tuple[int, ...], num_classes: int, **params: object) -> nn.Module:
    """Build model ``name``; unknown names fail listing the available ones.

    >>> build("cnn4", (1, 28, 28), 10).classifier.weight.shape
    torch.Size([10, 256])
    """
    if name not in MODELS:
        raise ConfigError(f"model.name={name!r}: unknown model; available: {', '.join(MODELS)}")
    return MODELS[name](input_shape=tuple(input_shape), num_classes=num_classes, **params)


def paper_init(model: nn.Module, std: float = 0.01) -> nn.Module:
    """Conv/linear weights ~ N(0, std) as in the FedBAT paper's code."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
    return model


from fedbat.models import cnn4, resnet10, small  # noqa: E402,F401
