"""Federated strategies: the server rule that turns a round's decoded, validated client
updates into the next global model, and owns the server-side state it needs.

The second registry of the framework, beside the compressors: every strategy composes with
every compressor, in both directions. ``fedavg`` is the readable reference; the others are
small differences from it (Flower's Strategy shape). Wrappers (``wrappers.py``) wrap any of
them. Every module of this package is imported at start, so a new file registers itself.

>>> ", ".join(sorted(STRATEGIES))
'fedadagrad, fedadam, fedavg, fedavgm, fedbuff, fedprox, fedyogi, median, scaffold, trimmed_mean'
>>> ", ".join(WRAPPERS.available())
'clip'
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from fedbat.errors import ConfigError
from fedbat.strategies.base import STRATEGIES, Strategy, register
from fedbat.strategies.wrappers import WRAPPERS, wrap

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["STRATEGIES", "WRAPPERS", "Strategy", "build", "register"]


def build(spec: str | Mapping[str, Any]) -> Strategy:
    """A strategy from a name or the ``strategy`` config group (``{name: ..., **params}``,
    ``wrap``: the wrappers around it)."""
    if isinstance(spec, str):
        return STRATEGIES.get(spec, key="strategy")
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(
            f"strategy={spec!r}: must name a strategy; "
            f"available: {', '.join(STRATEGIES.available())}"
        )
    params = dict(spec)
    wrappers = params.pop("wrap", None) or []
    if not isinstance(wrappers, list | tuple):
        raise ConfigError(f"strategy.wrap={wrappers!r}: must be a list of wrappers")
    return wrap(STRATEGIES.get(params.pop("name"), key="strategy", **params), wrappers)
