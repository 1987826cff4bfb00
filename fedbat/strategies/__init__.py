"""Federated strategies: the server rule that turns a round's decoded, validated client
updates into the next global model, and owns the server-side state it needs.

The second registry of the framework, beside the compressors: every strategy composes with
every compressor, in both directions. ``fedavg`` is the readable reference; the others are
small differences from it (Flower's Strategy shape).

>>> sorted(STRATEGIES)
['fedadagrad', 'fedadam', 'fedavg', 'fedavgm', 'fedprox', 'fedyogi']
"""

from fedbat.strategies.base import STRATEGIES, Strategy, build, register
from fedbat.strategies import adaptive, fedavg  # noqa: E402,F401  (registration)

__all__ = ["STRATEGIES", "Strategy", "build", "register"]
