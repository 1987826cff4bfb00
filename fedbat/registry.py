"""A name -> builder registry for one pluggable axis (models, datasets, partitions), whose
lookup error names the config key and lists every registered name."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from fedbat.errors import ConfigError

F = TypeVar("F", bound=Callable)


class Registry(dict):
    """>>> r = Registry("model.name", "model")
    >>> _ = r.register("tiny")(lambda: 1)
    >>> r.get("tiny")()
    1
    >>> r.get("huge")
    Traceback (most recent call last):
    ...
    fedbat.errors.ConfigError: model.name='huge': unknown model; available: tiny
    """

    def __init__(self, key: str, kind: str) -> None:
        super().__init__()
        self.key, self.kind = key, kind

    def register(self, name: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            self[name] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable:  # type: ignore[override]
        if name not in self:
            raise ConfigError(
                f"{self.key}={name!r}: unknown {self.kind}; available: {', '.join(self)}"
            )
        return self[name]
