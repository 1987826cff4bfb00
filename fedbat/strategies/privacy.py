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

The settings and their accounting: ``fedbat/strategies/privacy_budget.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from fedbat.errors import ConfigError
from fedbat.hooks import ClientHook
from fedbat.seeding import generator
from fedbat.strategies.base import Strategy
from fedbat.strategies.privacy_budget import Privacy, epsilon, local_epsilon
from fedbat.strategies.wrappers import StrategyWrapper, TransformHook, clip

NOISE = 0xD9  # the first part of every DP noise seed: never equal to a run's other draws


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
        self.released = 0  # noisy aggregates so far: what the accountant composes
        self.short: dict[int, int] = {}  # client mode: noisy arrivals m < K -> rounds
        limit = settings.max_epsilon
        if limit is not None and (first := self.epsilon(1)) > limit:
            raise ConfigError(
                f"privacy.max_epsilon={limit}: one round already costs epsilon {first:.4g} at "
                f"delta {settings.delta}; raise privacy.noise_multiplier or "
                "privacy.max_epsilon, or sample fewer clients a round"
            )
        self.clipped: list[bool] = []
        self.used_clip = self.clip  # the C of the last release
        self.client_side = settings.mode == "client"
        self.transforms_update = self.client_side

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

    def epsilon(self, more: int = 0) -> float:
        """After the releases so far and ``more`` with every sampled client's noise."""
        full = self.released - sum(self.short.values()) + more
        scaled = [(math.sqrt(m / self.per_round), n) for m, n in sorted(self.short.items())]
        rounds = ((1.0, full), *scaled) if scaled else full
        return epsilon(self.settings, self.population, self.per_round, rounds)

    def client_hook(
        self,
        model: nn.Module,
        held: Mapping[str, torch.Tensor],
        extra: Mapping[str, torch.Tensor],
        state: Mapping[str, torch.Tensor],
    ) -> ClientHook | None:
        inner = self.inner.client_hook(model, held, extra, state)
        return TransformHook(inner, self._noised) if self.client_side else inner

    def _noised(self, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Client mode: the update clipped to C, plus this client's share of the noise, std
        multiplier 2C / sqrt(K), drawn from its own seed (seed, round, client); integer
        tensors zeroed (they would reveal its step count)."""
        clipped, _ = clip(update, self.clip)
        gen = generator(NOISE, torch.initial_seed())  # train_client seeded it per client
        std = self.noise_std / math.sqrt(self.per_round)
        out = {}
        for name in sorted(clipped):
            v = clipped[name]
            if v.is_floating_point():
                noise = torch.randn(v.shape, generator=gen, dtype=torch.float64) * std
                out[name] = (v.double() + noise).to(v.dtype)
            else:
                out[name] = torch.zeros_like(v)
        return out

    def combine(
        self, updates: Sequence[Mapping[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        """The noisy mean; ``weights`` are ignored (uniform: one client, one bound). In client
        mode the clients clipped and noised: the sum of what arrived, over K."""
        self.clipped, total, floats = [], {}, {}
        for update in updates:  # walked once: each is decoded as it is read
            if self.client_side:
                clipped, scaled = dict(update), False
            else:
                clipped, scaled = clip(update, self.clip)
            self.clipped.append(scaled)
            for name, v in clipped.items():
                if name not in total:
                    total[name] = torch.zeros(v.shape, dtype=torch.float64)
                    floats[name] = v.is_floating_point()
                if floats[name]:
                    total[name] += v.to(torch.float64)
        gen = generator(NOISE, self.seed, self.released)
        std, out = 0.0 if self.client_side else self.noise_std, {}
        for name in sorted(total):  # an integer tensor stays as it is: a zero update
            if floats[name]:
                noise = torch.randn(total[name].shape, generator=gen, dtype=torch.float64)
                total[name] = (total[name] + std * noise) / self.per_round
            out[name] = total[name].to(torch.float32)
        self.used_clip = self.clip
        if self.client_side and len(self.clipped) < self.per_round:  # less noise arrived
            self.short[len(self.clipped)] = self.short.get(len(self.clipped), 0) + 1
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
        if limit is None or self.epsilon(1) <= limit:
            return self.inner.stop_reason()
        return (
            f"privacy: stopped after {self.released} noisy rounds at epsilon "
            f"{self.epsilon():.4g} (delta {self.settings.delta}); one more would "
            f"spend {self.epsilon(1):.4g} > privacy.max_epsilon={limit}"
        )

    def metrics(self) -> dict[str, float]:
        out = self.inner.metrics()
        out["privacy/epsilon"] = self.epsilon()
        out["privacy/noise_std"] = self.multiplier * 2 * self.used_clip
        out["privacy/clip"] = self.used_clip
        if self.client_side:
            eps = local_epsilon(self.settings, self.per_round, self.released)
            out["privacy/epsilon_local"] = eps
        elif self.clipped:
            out["privacy/clipped_fraction"] = sum(self.clipped) / len(self.clipped)
        return out

    def describe(self) -> str:
        c = f"adaptive (from {self.clip:g})" if self.settings.adaptive else f"{self.clip:g}"
        where = (
            f"each client clips its update to L2 {c} and adds noise of std "
            f"{self.noise_std / math.sqrt(self.per_round):.4g}, the server sums them uniformly"
            if self.client_side
            else f"each decoded update clipped to L2 {c}, uniform weights, noise std "
            f"{self.noise_std:.4g} on the sum"
        )
        first = epsilon(self.settings, self.population, self.per_round, 1)
        return (
            f"privacy: DP-FedAvg, {where}, divided by {self.per_round} clients; epsilon "
            f"{first:.4g} after one round at delta {self.settings.delta}"
        )

    def state_dict(self) -> dict[str, Any]:
        kept = {"released": self.released, "clip": self.clip, "short": dict(self.short)}
        return super().state_dict() | kept

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.released, self.clip = int(state["released"]), float(state["clip"])
        self.short = {int(m): int(n) for m, n in state["short"].items()}


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
