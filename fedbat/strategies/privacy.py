"""Central client-level differential privacy: DP-FedAvg (McMahan et al., ICLR 2018), as a
wrapper around any mean-based strategy, and its accounting by Google's ``dp-accounting``.

Each round the server clips every *decoded* update to L2 norm C (over all its float tensors,
so it composes with every uplink compressor), sums them with uniform weights, adds Gaussian
noise of std z*C to every coordinate of the sum, and divides by the fixed number of clients a
round K (not the number that arrived: the sensitivity bound needs a public denominator). The
wrapped strategy then applies that mean as it would any (FedAvgM's momentum, FedAdam's
moments: post-processing). Integer tensors (BatchNorm's step counters) are not aggregated:
they would reveal how many steps a client took. The noise is drawn from (seed, release), so
runs are deterministic, resume bitwise and are equal on 1 and N processes.

Accounting: fedbat samples K of the N clients uniformly without replacement each round, so
a round is ``SampledWithoutReplacementDpEvent(N, K, GaussianDpEvent(z / 2))`` under the
replace-one relation (one client's data replaced by another's moves the clipped sum by up to
2C, and dp-accounting's noise multiplier is the noise std over that sensitivity), composed
over the rounds released, in the RDP accountant (Wang, Balle & Kasiviswanathan 2019, Thm 27).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedbat.errors import ConfigError, check_range
from fedbat.seeding import generator
from fedbat.strategies.base import Strategy
from fedbat.strategies.wrappers import StrategyWrapper, clip

NOISE = 0xD9  # the first part of every DP noise seed: never equal to a run's other draws


@functools.lru_cache(maxsize=4096)
def epsilon(
    noise_multiplier: float, num_clients: int, per_round: int, rounds: int, delta: float
) -> float:
    """The epsilon at ``delta`` of ``rounds`` releases of DP-FedAvg (module docstring)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    if rounds == 0:
        return 0.0
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / 2)
    event = dp_accounting.SampledWithoutReplacementDpEvent(num_clients, per_round, gaussian)
    relation = dp_accounting.NeighboringRelation.REPLACE_ONE
    accountant = RdpAccountant(neighboring_relation=relation)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


class DPFedAvg(StrategyWrapper):
    """Clip each decoded update to ``clip``, sum uniformly, add N(0, (z C)^2), divide by K."""

    name = "dp"

    def __init__(
        self,
        clip: float,
        noise_multiplier: float,
        delta: float,
        max_epsilon: float | None,
        *,
        seed: int,
        num_clients: int,
        per_round: int,
    ) -> None:
        check_range("privacy.clip", clip, 0.0, 1e12, low_open=True)
        check_range("privacy.noise_multiplier", noise_multiplier, 0.0, 1e6, low_open=True)
        check_range("privacy.delta", delta, 0.0, 1.0, low_open=True)
        self.clip, self.z, self.delta = float(clip), float(noise_multiplier), float(delta)
        self.seed, self.population, self.per_round = seed, num_clients, per_round
        self.max_epsilon = None if max_epsilon is None else float(max_epsilon)
        if self.max_epsilon is not None:
            check_range("privacy.max_epsilon", max_epsilon, 0.0, 1e6, low_open=True)
            if (first := self.epsilon(1)) > self.max_epsilon:
                raise ConfigError(
                    f"privacy.max_epsilon={max_epsilon}: one round already costs epsilon "
                    f"{first:.4g} at delta {delta}; raise privacy.noise_multiplier or "
                    "privacy.max_epsilon, or sample fewer clients a round"
                )
        self.released = 0  # noisy aggregates so far: what the accountant composes
        self.clipped: list[bool] = []
        self.transforms_update = False

    def wrap(self, inner: Strategy) -> StrategyWrapper:
        base = inner
        while isinstance(base, StrategyWrapper):
            base = base.inner
        if type(base).combine is not Strategy.combine:
            raise ConfigError(
                f"privacy=dp with strategy={base.name}: its rule is not a mean of the updates, "
                "so DP-FedAvg cannot bound its sensitivity; use fedavg, fedavgm, fedprox, "
                "fedadam, fedadagrad or fedyogi"
            )
        return super().wrap(inner)

    def epsilon(self, rounds: int) -> float:
        return epsilon(self.z, self.population, self.per_round, rounds, self.delta)

    def combine(
        self, updates: Sequence[Mapping[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        """The noisy mean; ``weights`` are ignored (uniform: one client, one bound)."""
        self.clipped, total, floats = [], {}, {}
        for update in updates:  # walked once: each is decoded as it is read
            clipped, scaled = clip(update, self.clip)
            self.clipped.append(scaled)
            for name, v in clipped.items():
                if name not in total:
                    total[name] = torch.zeros(v.shape, dtype=torch.float64)
                    floats[name] = v.is_floating_point()
                if floats[name]:
                    total[name] += v.to(torch.float64)
        gen = generator(NOISE, self.seed, self.released)
        std, out = self.z * self.clip, {}
        for name in sorted(total):  # an integer tensor stays as it is: a zero update
            if floats[name]:
                noise = torch.randn(total[name].shape, generator=gen, dtype=torch.float64)
                total[name] = (total[name] + std * noise) / self.per_round
            out[name] = total[name].to(torch.float32)
        self.released += 1
        return out

    def stop_reason(self) -> str:
        if self.max_epsilon is None or self.epsilon(self.released + 1) <= self.max_epsilon:
            return self.inner.stop_reason()
        return (
            f"privacy: stopped after {self.released} noisy rounds at epsilon "
            f"{self.epsilon(self.released):.4g} (delta {self.delta}); one more would spend "
            f"{self.epsilon(self.released + 1):.4g} > privacy.max_epsilon={self.max_epsilon}"
        )

    def metrics(self) -> dict[str, float]:
        out = self.inner.metrics()
        out["privacy/epsilon"] = self.epsilon(self.released)
        out["privacy/noise_std"] = self.z * self.clip
        if self.clipped:
            out["privacy/clipped_fraction"] = sum(self.clipped) / len(self.clipped)
        return out

    def describe(self) -> str:
        return (
            f"privacy: DP-FedAvg, each decoded update clipped to L2 {self.clip}, uniform weights, "
            f"noise std {self.z * self.clip:.4g} on the sum, divided by {self.per_round} clients; "
            f"epsilon {self.epsilon(1):.4g} after one round at delta {self.delta}"
        )

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"released": self.released}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.released = int(state["released"])


def private(strategy: Strategy, cfg: Mapping[str, Any], **run: int) -> Strategy:
    """``strategy`` under the ``privacy`` config group (``run``: seed, num_clients,
    per_round)."""
    name = cfg.get("name", "none")
    if name == "none":
        return strategy
    if name != "dp":
        raise ConfigError(f"privacy={name!r}: must be none or dp")
    params = {k: v for k, v in cfg.items() if k != "name"}
    allowed = {"clip", "noise_multiplier", "delta", "max_epsilon"}
    if extra := sorted(set(params) - allowed):
        raise ConfigError(
            f"privacy.{extra[0]}: no such key; privacy=dp has: {', '.join(sorted(allowed))}"
        )
    return DPFedAvg(**params, **run).wrap(strategy)
