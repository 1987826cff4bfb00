"""A name -> builder registry for one pluggable axis (models, datasets, partitions; and, as
:class:`ClassRegistry`, compressors and strategies), whose lookup error names the config key
and lists every registered name."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
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


class ClassRegistry(Registry):
    """``name -> {"cls", "description", "init_params"}``; :meth:`get` builds an instance.

    One class may be registered under several names with different default parameters
    (``signsgd`` and ``ef_signsgd`` differ only in ``error_feedback``). Compressors and
    strategies are both kept in one.
    """

    def register(  # type: ignore[override]
        self, name: str, cls: type | None = None, description: str = "", **init_params: Any
    ) -> Callable[[type], type] | type:
        """Register ``cls`` under ``name``; usable as a class decorator when ``cls`` is None."""

        def deco(klass: type) -> type:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            # the docstring's first paragraph, on one line
            desc = description or " ".join((inspect.getdoc(klass) or "").split("\n\n")[0].split())
            self[name] = {"cls": klass, "description": desc, "init_params": init_params}
            return klass

        return deco if cls is None else deco(cls)

    def get(self, name: str, key: str | None = None, **params: Any):
        """Build the compressor ``name``; bad names or parameters raise one-line ConfigErrors."""
        key = key or self.key
        entry = super().get(name, key)
        cls = entry["cls"]
        allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ConfigError(
                f"{key}.{unknown[0]}: not a parameter of {self.kind} {name!r}; "
                f"allowed: {', '.join(allowed) or 'none'}"
            )
        try:
            obj = cls(**{**entry["init_params"], **params})
        except ConfigError as err:
            raise ConfigError(f"{key}.{err}") from None
        obj.name = name
        return obj

    def available(self) -> list[str]:
        return sorted(self)

    def describe(self) -> Mapping[str, str]:
        return {name: self[name]["description"] for name in self.available()}
