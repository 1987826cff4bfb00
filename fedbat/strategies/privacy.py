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
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from fedbat.errors import ConfigError, check_range
from fedbat.seeding import generator
from fedbat.strategies.base import Strategy
from fedbat.strategies.wrappers import StrategyWrapper, clip

NOISE = 0xD9  # the first part of every DP noise seed: never equal to a run's other draws


@dataclass(frozen=True)
class Privacy:
    """The ``privacy=dp`` config group, checked. ``clip="auto"``: adaptive clipping."""

    clip: float | str = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    max_epsilon: float | None = None
    target_quantile: float = 0.5  # adaptive: the quantile of update norms C tracks
    clip_lr: float = 0.2  # adaptive: eta of the geometric update of C
    initial_clip: float = 0.1  # adaptive: C before the first round
    count_noise: float | None = None  # adaptive: std of the clipped count's noise (K / 20)

    def __post_init__(self) -> None:
        if self.clip != "auto":
            check_range("privacy.clip", self.clip, 0.0, 1e12, low_open=True)
        check_range("privacy.noise_multiplier", self.noise_multiplier, 0.0, 1e6, low_open=True)
        check_range("privacy.delta", self.delta, 0.0, 1.0, low_open=True)
        if self.max_epsilon is not None:
            check_range("privacy.max_epsilon", self.max_epsilon, 0.0, 1e6, low_open=True)
        check_range("privacy.target_quantile", self.target_quantile, 0.0, 1.0)
        check_range("privacy.clip_lr", self.clip_lr, 0.0, 10.0)
        check_range("privacy.initial_clip", self.initial_clip, 0.0, 1e12, low_open=True)
        if self.count_noise is not None:
            check_range("privacy.count_noise", self.count_noise, 0.0, 1e6, low_open=True)

    @property
    def adaptive(self) -> bool:
        return self.clip == "auto"

    def count_std(self, per_round: int) -> float | None:
        """sigma_b, the clipped count's noise std (adaptive clipping only)."""
        if not self.adaptive:
            return None
        sigma_b = self.count_noise if self.count_noise is not None else per_round / 20
        if sigma_b <= self.noise_multiplier / 2:
            raise ConfigError(
                f"privacy.count_noise={sigma_b:g}: must exceed noise_multiplier / 2 = "
                f"{self.noise_multiplier / 2:g}, or the update is left no noise budget"
            )
        return sigma_b

    def update_multiplier(self, per_round: int) -> float:
        """The update's noise over its replace-one sensitivity 2C: z / 2, less the count's
        share with adaptive clipping (Andrew et al. 2021, Thm 1: the two Gaussians on one
        sample compose as one of multiplier (m_update^-2 + sigma_b^-2)^-1/2 = z / 2)."""
        sigma_b = self.count_std(per_round)
        half = self.noise_multiplier / 2
        return half if sigma_b is None else (half**-2 - sigma_b**-2) ** -0.5


@functools.lru_cache(maxsize=4096)
def epsilon(settings: Privacy, num_clients: int, per_round: int, rounds: int) -> float:
    """The epsilon at ``settings.delta`` of ``rounds`` releases (module docstring)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    if rounds == 0:
        return 0.0
    mechanism = dp_accounting.GaussianDpEvent(settings.update_multiplier(per_round))
    if (sigma_b := settings.count_std(per_round)) is not None:  # the count is released too
        count = dp_accounting.GaussianDpEvent(sigma_b)  # replace-one sensitivity 1
        mechanism = dp_accounting.ComposedDpEvent([mechanism, count])
    event = dp_accounting.SampledWithoutReplacementDpEvent(num_clients, per_round, mechanism)
    relation = dp_accounting.NeighboringRelation.REPLACE_ONE
    accountant = RdpAccountant(neighboring_relation=relation)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(settings.delta))


class DPFedAvg(StrategyWrapper):
    """Clip each decoded update to C, sum uniformly, add N(0, (z C)^2), divide by K."""

    name = "dp"

    def __init__(self, settings: Privacy, *, seed: int, num_clients: int, per_round: int) -> None:
        self.settings, self.seed, self.population, self.per_round = (
            settings,
            seed,
            num_clients,
            per_round,
        )
        self.clip = settings.initial_clip if settings.adaptive else float(settings.clip)
        self.multiplier = settings.update_multiplier(per_round)
        limit = settings.max_epsilon
        if limit is not None and (first := self.epsilon(1)) > limit:
            raise ConfigError(
                f"privacy.max_epsilon={limit}: one round already costs epsilon {first:.4g} at "
                f"delta {settings.delta}; raise privacy.noise_multiplier or "
                "privacy.max_epsilon, or sample fewer clients a round"
            )
        self.released = 0  # noisy aggregates so far: what the accountant composes
        self.clipped: list[bool] = []
        self.used_clip = self.clip  # the C of the last release
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
        return epsilon(self.settings, self.population, self.per_round, rounds)

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
        std, out = self.noise_std, {}
        for name in sorted(total):  # an integer tensor stays as it is: a zero update
            if floats[name]:
                noise = torch.randn(total[name].shape, generator=gen, dtype=torch.float64)
                total[name] = (total[name] + std * noise) / self.per_round
            out[name] = total[name].to(torch.float32)
        self.used_clip = self.clip
        if self.settings.adaptive:
            self._adapt(gen)
        self.released += 1
        return out

    @property
    def noise_std(self) -> float:
        """The noise std on the sum: the multiplier times the replace-one sensitivity 2C."""
        return self.multiplier * 2 * self.clip

    def _adapt(self, gen: torch.Generator) -> None:
        """Andrew et al.'s geometric step of C towards the target quantile of the norms, from
        the noised fraction of unclipped updates."""
        s = self.settings
        unclipped = len(self.clipped) - sum(self.clipped)
        noise = float(torch.randn((), generator=gen, dtype=torch.float64))
        fraction = (unclipped + s.count_std(self.per_round) * noise) / self.per_round
        self.clip *= math.exp(-s.clip_lr * (fraction - s.target_quantile))

    def stop_reason(self) -> str:
        limit = self.settings.max_epsilon
        if limit is None or self.epsilon(self.released + 1) <= limit:
            return self.inner.stop_reason()
        return (
            f"privacy: stopped after {self.released} noisy rounds at epsilon "
            f"{self.epsilon(self.released):.4g} (delta {self.settings.delta}); one more would "
            f"spend {self.epsilon(self.released + 1):.4g} > privacy.max_epsilon={limit}"
        )

    def metrics(self) -> dict[str, float]:
        out = self.inner.metrics()
        out["privacy/epsilon"] = self.epsilon(self.released)
        out["privacy/noise_std"] = self.multiplier * 2 * self.used_clip
        out["privacy/clip"] = self.used_clip
        if self.clipped:
            out["privacy/clipped_fraction"] = sum(self.clipped) / len(self.clipped)
        return out

    def describe(self) -> str:
        c = f"adaptive (from {self.clip:g})" if self.settings.adaptive else f"{self.clip:g}"
        return (
            f"privacy: DP-FedAvg, each decoded update clipped to L2 {c}, uniform weights, "
            f"noise std {self.noise_std:.4g} on the sum, divided by {self.per_round} clients; "
            f"epsilon {self.epsilon(1):.4g} after one round at delta {self.settings.delta}"
        )

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"released": self.released, "clip": self.clip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.released, self.clip = int(state["released"]), float(state["clip"])


def private(strategy: Strategy, cfg: Mapping[str, Any], **run: int) -> Strategy:
    """``strategy`` under the ``privacy`` config group (``run``: seed, num_clients,
    per_round)."""
    name = cfg.get("name", "none")
    if name == "none":
        return strategy
    if name != "dp":
        raise ConfigError(f"privacy={name!r}: must be none or dp")
    params = {k: v for k, v in cfg.items() if k != "name"}
    allowed = {f.name for f in fields(Privacy)}
    if extra := sorted(set(params) - allowed):
        has = ", ".join(sorted(allowed))
        raise ConfigError(f"privacy.{extra[0]}: no such key; privacy=dp has: {has}")
    return DPFedAvg(Privacy(**params), **run).wrap(strategy)
