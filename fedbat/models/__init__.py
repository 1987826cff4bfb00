"""Model registry: ``model.name`` -> a builder taking the input shape and class count."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping

import torch
from torch import nn

from fedbat.errors import ConfigError
from fedbat.registry import Registry

MODELS = Registry("model.name", "model")
register = MODELS.register  # add a builder ``fn(input_shape, num_classes, **params)``


def build(name: str, input_shape: tuple[int, ...], num_classes: int, **params: object) -> nn.Module:
    """Build model ``name``; unknown names fail listing the available ones.

    >>> build("cnn4", (1, 28, 28), 10).classifier.weight.shape
    torch.Size([10, 256])
    """
    return MODELS.get(name)(input_shape=tuple(input_shape), num_classes=num_classes, **params)


def check_params(model_cfg: Mapping[str, object]) -> None:
    """The ``model.*`` parameters against the builder's signature: known names, the type of
    each default, integers >= 1 and finite numbers >= 0 (sizes, widths, scales)."""
    name = model_cfg["name"]
    params = inspect.signature(MODELS.get(str(name))).parameters
    allowed = [
        p
        for p, v in params.items()
        if p not in ("input_shape", "num_classes")
        and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)
    ]
    open_ended = any(v.kind == v.VAR_KEYWORD for v in params.values())
    for key, value in model_cfg.items():
        if key == "name" or (key not in params and open_ended):
            continue
        if key not in allowed:
            raise ConfigError(
                f"model.{key}: not a parameter of model {name!r}; allowed: "
                f"{', '.join(allowed) or 'none'}"
            )
        default = params[key].default
        if isinstance(default, bool) or not isinstance(default, int | float):
            continue
        ok = not isinstance(value, bool) and isinstance(value, type(default) | int)
        if isinstance(default, int):
            ok = ok and isinstance(value, int) and value >= 1
        elif ok:
            ok = math.isfinite(value) and value >= 0
        if not ok:
            what = "an integer >= 1" if isinstance(default, int) else "a finite number >= 0"
            raise ConfigError(f"model.{key}={value!r}: must be {what}")


def check_fits(model: nn.Module, name: str, input_shape: tuple[int, ...]) -> None:
    """One forward pass on a zero input of the dataset's shape, so that a model that cannot
    take the data fails before training, naming both."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    except (RuntimeError, ValueError, IndexError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ConfigError(
            f"model.name={name!r}: does not take the dataset's inputs of shape "
            f"{tuple(input_shape)} ({reason})"
        ) from None
    finally:
        model.train(was_training)


def paper_init(model: nn.Module, std: float = 0.01) -> nn.Module:
    """Conv/linear weights ~ N(0, std) as in the FedBAT paper's code."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
    return model


from fedbat.models import cnn4, resnet10, small  # noqa: E402,F401
