"""``scaffold`` (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", Algorithm 1 with option II).

The server holds a control variate ``c`` and each client its own ``c_i`` (zero at first).
A client trains from the model ``x`` it holds with every gradient corrected by
``c - c_i``, then sets ``c_i+ = c_i - c + (x - y_i) / (K lr)`` and sends
``dc_i = c_i+ - c_i`` beside its update ``dy_i = y_i - x``. The server moves ``x`` by the
weighted mean of the ``dy_i`` (as FedAvg) and ``c`` by ``sum(dc_i) / N`` over the accepted
clients, N the population.

In fedbat the ``dc_i`` ride in the client's packet and ``c`` in the broadcast, under the
same compressors (and error feedback) as the model, so their bits count. Three choices,
each exact for ``compressor=none`` and the paper's SGD:
- the correction is the gradient of the linear term ``<c - c_i, w>`` added to the loss,
  so it reaches whatever tensor trains a weight (FedBAT's learned update included);
- ``K lr`` is the sum of the learning rates of the steps taken (param group 0), so a
  schedule is honoured; SCAFFOLD assumes an SGD client optimizer;
- ``x - y_i`` is the update as the server decodes it from the client's packet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedbat.compressors.plan import TensorSpec
from fedbat.hooks import ClientHook
from fedbat.strategies.base import register, weighted_sum
from fedbat.strategies.fedavg import FedAvg, current

PREFIX = "scaffold/"  # names of the control-variate tensors in packets and client state


class ControlVariates(ClientHook):
    """A client's side of SCAFFOLD: the gradient correction and its new control variate."""

    def __init__(
        self,
        model: nn.Module,
        server_c: Mapping[str, torch.Tensor],
        client_c: Mapping[str, torch.Tensor],
    ) -> None:
        self.model = model
        device = next(model.parameters()).device
        names = [k.removeprefix(PREFIX) for k in server_c if k.startswith(PREFIX)]
        self.c = {n: server_c[PREFIX + n] for n in names}  # the travelling parameters only
        self.c_i = {n: client_c.get(PREFIX + n, torch.zeros_like(c)) for n, c in self.c.items()}
        self.correction = {n: (self.c[n] - self.c_i[n]).to(device) for n in self.c}
        self.lr_sum = 0.0

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        term = sum((d * current(self.model, n)).sum() for n, d in self.correction.items())
        return loss + term

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.lr_sum += float(optimizer.param_groups[0]["lr"])

    def message(self, sent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``dc_i = -c + (x - y_i) / (K lr)``, with ``y_i - x`` the update as sent."""
        self.delta = {n: -self.c[n] - sent[n].to(torch.float32) / self.lr_sum for n in self.c}
        return {PREFIX + n: d for n, d in self.delta.items()}

    def client_state(self) -> dict[str, torch.Tensor]:
        return {PREFIX + n: self.c_i[n] + self.delta[n] for n in self.c}


@register("scaffold")
class Scaffold(FedAvg):
    """FedAvg with control variates that correct client drift (Karimireddy et al. 2020)."""

    def setup(self, params: Mapping[str, nn.Parameter], num_clients: int = 1) -> None:
        super().setup(params, num_clients)
        self.c = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}

    def extra_plan(self, plan: list[TensorSpec]) -> list[TensorSpec]:
        """One fp32 tensor per model parameter, compressed where the parameter is."""
        return [
            TensorSpec(PREFIX + s.name, s.shape, torch.float32, s.compressed)
            for s in plan
            if s.name in self.params
        ]

    def broadcast_state(self) -> dict[str, torch.Tensor]:
        return {PREFIX + n: c.clone() for n, c in self.c.items()}

    def client_state_plan(self, plan: list[TensorSpec]) -> list[TensorSpec]:
        """A client keeps its ``c_i``: one fp32 tensor per parameter, as ``dc_i`` travels."""
        return self.extra_plan(plan)

    def combine(
        self, updates: Sequence[Mapping[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        """The weighted mean of the model updates (as FedAvg) and ``sum(dc_i) / N``, summed
        in float64 in client-id order, in one pass."""
        total = float(sum(weights))
        summed = weighted_sum(
            updates, weights, lambda name, w: 1.0 if name.startswith(PREFIX) else w / total
        )
        return {
            name: (acc / self.num_clients if name.startswith(PREFIX) else acc).to(torch.float32)
            for name, acc in summed.items()
        }

    @torch.no_grad()
    def apply(self, delta: Mapping[str, torch.Tensor]) -> None:
        super().apply(delta)
        for name, c in self.c.items():
            c += delta[PREFIX + name]

    def client_hook(
        self,
        model: nn.Module,
        held: Mapping[str, torch.Tensor],
        extra: Mapping[str, torch.Tensor],
        state: Mapping[str, torch.Tensor],
    ) -> ClientHook:
        return ControlVariates(model, extra, state)

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"c": {n: c.clone() for n, c in self.c.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for n, c in state["c"].items():
            self.c[n].copy_(c)
