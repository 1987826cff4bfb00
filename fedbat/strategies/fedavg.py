"""``fedavg`` (McMahan et al. 2017), ``fedavgm`` (server momentum, Hsu et al. 2019) and
``fedprox`` (Li et al. 2020): the weighted mean update applied by server SGD; FedProx adds
``mu/2 ||w - w_received||^2`` to every client's loss, on whatever task."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedbat.errors import check_range
from fedbat.hooks import ClientHook
from fedbat.strategies.base import Strategy, register


@register("fedavg")
class FedAvg(Strategy):
    """Weighted mean of the client updates, applied by server SGD (lr 1, no momentum: FedAvg)."""

    def __init__(self, lr: float = 1.0, momentum: float = 0.0) -> None:
        super().__init__(lr)
        check_range("momentum", momentum, 0.0, 0.999)
        self.momentum = float(momentum)

    def setup(self, params: Mapping[str, nn.Parameter], num_clients: int = 1) -> None:
        super().setup(params, num_clients)
        self.optimizer = torch.optim.SGD(self.params.values(), lr=self.lr, momentum=self.momentum)

    @torch.no_grad()
    def apply(self, delta: Mapping[str, torch.Tensor]) -> None:
        """One server SGD step with gradient ``-delta``."""
        self.optimizer.zero_grad(set_to_none=False)
        for name, p in self.params.items():
            p.grad = -delta[name].to(p.dtype)
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


register(
    "fedavgm", FedAvg, description="FedAvg with server momentum (Hsu et al. 2019)", momentum=0.9
)


class ProximalTerm(ClientHook):
    """Adds ``mu/2 sum ||w - w_received||^2`` over the client's parameters to its loss."""

    def __init__(self, model: nn.Module, held: Mapping[str, torch.Tensor], mu: float) -> None:
        self.model, self.mu = model, mu
        # before any parametrization; a frozen parameter adds only a constant
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        device = next(model.parameters()).device
        self.anchor = {n: held[n].to(device) for n in self.names}

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        term = sum(((current(self.model, n) - a) ** 2).sum() for n, a in self.anchor.items())
        return loss + 0.5 * self.mu * term


def current(model: nn.Module, name: str) -> torch.Tensor:
    """The tensor a layer uses now (through a parametrization, when one is attached)."""
    path, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(path) if path else model, attr)


@register("fedprox")
class FedProx(FedAvg):
    """FedAvg whose clients minimise ``loss + mu/2 ||w - w_received||^2`` (Li et al. 2020)."""

    def __init__(self, lr: float = 1.0, momentum: float = 0.0, mu: float = 0.01) -> None:
        super().__init__(lr, momentum)
        check_range("mu", mu, 0.0, 1e6)
        self.mu = float(mu)

    def client_hook(
        self,
        model: nn.Module,
        held: Mapping[str, torch.Tensor],
        extra: Mapping[str, torch.Tensor],
        state: Mapping[str, torch.Tensor],
    ) -> ClientHook | None:
        return ProximalTerm(model, held, self.mu) if self.mu > 0 else None
