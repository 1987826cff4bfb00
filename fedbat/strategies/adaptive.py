"""``fedadam``, ``fedyogi``, ``fedadagrad``: adaptive server optimizers on the mean client
update, as in Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2:

    m = beta1 m + (1 - beta1) delta
    v = beta2 v + (1 - beta2) delta^2                  (FedAdam)
    v = v - (1 - beta2) delta^2 sign(v - delta^2)       (FedYogi)
    v = v + delta^2                                     (FedAdagrad)
    w = w + lr m / (sqrt(v) + tau)

with ``m`` starting at 0 and ``v`` at ``tau^2`` (the paper's ``v_{-1} >= tau^2``), no bias
correction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedbat.errors import check_range
from fedbat.strategies.base import Strategy, register


class Adaptive(Strategy):
    """The shared rule; subclasses give the second-moment update."""

    def __init__(
        self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(lr)
        check_range("beta1", beta1, 0.0, 0.999999)
        check_range("beta2", beta2, 0.0, 0.999999)
        check_range("tau", tau, 0.0, 1.0, low_open=True)
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)

    def setup(self, params: Mapping[str, nn.Parameter], num_clients: int = 1) -> None:
        super().setup(params, num_clients)
        self.m = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.v = {n: torch.full_like(p, self.tau**2) for n, p in self.params.items()}

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def apply(self, delta: Mapping[str, torch.Tensor]) -> None:
        for name, p in self.params.items():
            d = delta[name].to(p.dtype)
            self.m[name] = self.beta1 * self.m[name] + (1 - self.beta1) * d
            self.v[name] = self.second_moment(self.v[name], d * d)
            p += self.lr * self.m[name] / (self.v[name].sqrt() + self.tau)

    def state_dict(self) -> dict[str, Any]:
        return {"m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m = {n: t.clone() for n, t in state["m"].items()}
        self.v = {n: t.clone() for n, t in state["v"].items()}


@register("fedadam")
class FedAdam(Adaptive):
    """Adam on the server (Reddi et al. 2021)."""

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * d2


@register("fedyogi")
class FedYogi(Adaptive):
    """Yogi on the server: v moves towards delta^2 additively (Reddi et al. 2021)."""

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * d2 * torch.sign(v - d2)


@register("fedadagrad")
class FedAdagrad(Adaptive):
    """Adagrad on the server (Reddi et al. 2021); beta2 is unused."""

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v + d2
