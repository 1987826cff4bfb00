"""The ``privacy=dp`` settings and what they cost, by Google's ``dp-accounting``.

Accounting: fedbat samples K of the N clients uniformly without replacement each round, so
a round is ``SampledWithoutReplacementDpEvent(N, K, GaussianDpEvent(z / 2))`` under the
replace-one relation (one client's data replaced by another's moves the clipped sum by up to
2C, and dp-accounting's noise multiplier is the noise std over that sensitivity), composed
over the rounds released, in the RDP accountant (Wang, Balle & Kasiviswanathan 2019, Thm 27).
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from types import ModuleType

from fedbat.errors import ConfigError, check_range


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
    mode: str = "server"  # client: each client clips and adds its share of the noise

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
        if self.mode not in ("server", "client"):
            raise ConfigError(f"privacy.mode={self.mode!r}: must be server or client")
        if self.mode == "client" and self.adaptive:
            raise ConfigError(
                "privacy.clip=auto with privacy.mode=client: clients clip to a C they know; "
                "give privacy.clip a number"
            )

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


Releases = tuple[tuple[float, int], ...]  # (noise scale, rounds): 1.0 is the full noise


@functools.cache
def accounting() -> ModuleType:
    """``dp_accounting`` (with ``.rdp``), imported on first use. It imports absl, whose logging
    handler keeps the ``sys.stderr`` of that moment and closes it whenever logging is
    reconfigured (Hydra does, each job) unless it is the process's own: so it gets the
    process's own (a test runner's captured stream would otherwise be closed under it)."""
    import dp_accounting
    import dp_accounting.rdp
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__
    return dp_accounting


@functools.lru_cache(maxsize=4096)
def epsilon(settings: Privacy, num_clients: int, per_round: int, rounds: int | Releases) -> float:
    """The epsilon at ``settings.delta`` of ``rounds`` releases (module docstring); client
    mode's rounds in which fewer clients added noise count at their scale sqrt(m / K)."""
    dp_accounting = accounting()
    RdpAccountant = dp_accounting.rdp.RdpAccountant

    relation = dp_accounting.NeighboringRelation.REPLACE_ONE
    accountant = RdpAccountant(neighboring_relation=relation)
    releases = ((1.0, rounds),) if isinstance(rounds, int) else rounds
    for scale, count in releases:
        mechanism = dp_accounting.GaussianDpEvent(scale * settings.update_multiplier(per_round))
        if (sigma_b := settings.count_std(per_round)) is not None:  # the count is a release
            count_event = dp_accounting.GaussianDpEvent(sigma_b)  # replace-one sensitivity 1
            mechanism = dp_accounting.ComposedDpEvent([mechanism, count_event])
        event = dp_accounting.SampledWithoutReplacementDpEvent(num_clients, per_round, mechanism)
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, count))
    return float(accountant.get_epsilon(settings.delta)) if sum(c for _, c in releases) else 0.0


@functools.lru_cache(maxsize=4096)
def local_epsilon(settings: Privacy, per_round: int, rounds: int) -> float:
    """Client mode: what one client's own noisy update reveals to the server that sees it
    (its share of the noise, multiplier z / (2 sqrt K)), composed over ``rounds`` as if it
    took part in every one: an upper bound with no sampling amplification."""
    dp_accounting = accounting()
    RdpAccountant = dp_accounting.rdp.RdpAccountant

    if rounds == 0:
        return 0.0
    share = dp_accounting.GaussianDpEvent(settings.update_multiplier(per_round) / per_round**0.5)
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(share, rounds))
    return float(accountant.get_epsilon(settings.delta))
