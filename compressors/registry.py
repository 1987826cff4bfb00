"""The compressor registry: names in configs -> compressor classes with default parameters."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from fedbat.errors import ConfigError
from fedbat.registry import Registry


class CompressorRegistry(Registry):
    """``name -> {"cls", "description", "init_params"}``; :meth:`get` builds an instance.

    One class may be registered under several names with different default parameters
    (``signsgd`` and ``ef_signsgd`` differ only in ``error_feedback``).
    """

    def __init__(self) -> None:
        super().__init__("compressor", "compressor")

    def register(  # type: ignore[override]
        self, name: str, cls: type | None = None, description: str = "", **init_params: Any
    ) -> Callable[[type], type] | type:
        """Register ``cls`` under ``name``; usable as a class decorator when ``cls`` is None."""

        def deco(klass: type) -> type:
            if name in self:
                raise ValueError(f"compressor {name!r} is already registered")
            desc = description or (inspect.getdoc(klass) or "").split("\n")[0]
            self[name] = {"cls": klass, "description": desc, "init_params": init_params}
            return klass

        return deco if cls is None else deco(cls)

    def get(self, name: str, key: str = "compressor", **params: Any):
        """Build the compressor ``name``; bad names or parameters raise one-line ConfigErrors."""
        entry = super().get(name, key)
        cls = entry["cls"]
        allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ConfigError(
                f"{key}.{unknown[0]}: not a parameter of compressor {name!r}; "
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


COMPRESSORS = CompressorRegistry()
register = COMPRESSORS.register
