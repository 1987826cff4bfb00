"""Federated strategies: the server rule that turns a round's decoded, validated client
updates into the next global model, and owns the server-side state it needs.

The second registry of the framework, beside the compressors: every strategy composes with
every compressor, in both directions. ``fedavg`` is the readable reference; the others are
small differences from it (Flower's Strategy shape).

>>> ", ".join(sorted(STRATEGIES))
'fedadagrad, fedadam, fedavg, fedavgm, fedprox, fedyogi, median, scaffold, trimmed_mean'
"""

from fedbat.strategies import adaptive, fedavg, robust, scaffold  # noqa: F401  (registration)
from fedbat.strategies.base import STRATEGIES, Strategy, build, register

__all__ = ["STRATEGIES", "Strategy", "build", "register"]
