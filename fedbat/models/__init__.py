"""Model registry: ``model.name`` -> a builder taking the input shape and class count."""

from __future__ import annotations

from torch import nn

from fedbat.registry import Registry

MODELS = Registry("model.name", "model")
register = MODELS.register  # add a builder ``fn(input_shape, num_classes, **params)``


def build(name: str, input_shape: tuple[int, ...], num_classes: int, **params: object) -> nn.Module:
    """Build model ``name``; unknown names fail listing the available ones.

    >>> build("cnn4", (1, 28, 28), 10).classifier.weight.shape
    torch.Size([10, 256])
    """
    return MODELS.get(name)(input_shape=tuple(input_shape), num_classes=num_classes, **params)


def paper_init(model: nn.Module, std: float = 0.01) -> nn.Module:
    """Conv/linear weights ~ N(0, std) as in the FedBAT paper's code."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
    return model


from fedbat.models import cnn4, resnet10, small  # noqa: E402,F401
