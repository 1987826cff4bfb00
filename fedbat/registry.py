"""A name -> builder registry for one pluggable axis (models, datasets, partitions,
compressors), whose lookup error names the config key and lists every registered name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

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

    def available(self) -> list[str]:
        return list(self)

    def get(self, name: str, key: str | None = None) -> Any:  # type: ignore[override]
        """The entry ``name``; else a ConfigError naming ``key`` (default: this registry's
        config key) and every registered name."""
        if name not in self:
            raise ConfigError(
                f"{key or self.key}={name!r}: unknown {self.kind}; "
                f"available: {', '.join(self.available())}"
            )
        return self[name]
