"""``fedbat``: Federated Binarization-Aware Training (ICML 2024), as in the paper and the
authors' code.

Uplink: during local training every compressed weight ``w`` (frozen) is used as ``w + U``
where the client learns an update ``m`` and a step parameter ``s``:
``alpha = clamp(alpha0 * exp(rho * s), 5e-4, 5e-2)``; for the first ``phi`` of the local
steps ``U = m``, then (``alpha0 = mean|m|`` at the switch) ``U = S(m, alpha)``, the
stochastic binarization below with its custom gradients. The client sends the sign bits of
a final draw of ``S`` and ``alpha``: 1 bit per element + one fp32 per layer.

Downlink (and any post-hoc use): ``S(x, mean|x|)`` on the server update, with server
error feedback by default.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from fedbat.compressors.base import Compressor, Fields
from fedbat.compressors.bits import decode_scaled_signs, encode_scaled_signs, scaled_signs_bytes
from fedbat.compressors.registry import register
from fedbat.errors import PacketError, check_range
from fedbat.hooks import ClientHook

ALPHA_MIN, ALPHA_MAX = 5e-4, 5e-2
_ALPHA_RANGE = torch.tensor([ALPHA_MIN, ALPHA_MAX])  # in fp32, as the clamp gives them


def binarize(m: torch.Tensor, alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """b = clamp(floor((m / alpha + 1) / 2 + u), 0, 1): stochastic rounding to {0, 1}.

    >>> binarize(torch.tensor([-1.0, 0.0, 1.0]), torch.tensor(0.5), torch.tensor([0.9, 0.4, 0.0]))
    tensor([0., 0., 1.])
    """
    return torch.clamp(torch.floor((m / alpha + 1) / 2 + u), 0, 1)


class ScaledBinarize(torch.autograd.Function):
    """w + S(m, alpha), S = alpha (2b - 1), with FedBAT's gradients (none for the frozen w).

    dS/dm = 1 where |m| <= alpha else 0; dS/dalpha = +1 (m > alpha), -1 (m < -alpha),
    (2b - 1) - m / alpha inside, summed over the layer. Outside, ``2b - 1`` already equals
    sign(m) (|m / alpha| >= 1 forces b), so dS/dalpha is ``(2b - 1) - (m / alpha) * inside``
    everywhere. Every step runs this on every compressed weight: the ops are fused in place,
    with the same roundings as the formulas above, so results are bitwise those of
    :func:`binarize` and the textbook expressions (tested).

    >>> m = torch.tensor([-1.0, 0.2, 1.0], requires_grad=True)
    >>> alpha = torch.tensor(0.5, requires_grad=True)
    >>> out = ScaledBinarize.apply(torch.zeros(3), m, alpha, torch.tensor([0.9, 0.4, 0.0]))
    >>> out.detach(), torch.autograd.grad(out.sum(), (m, alpha))
    (tensor([-0.5000,  0.5000,  0.5000]), (tensor([0., 1., 0.]), tensor(0.6000)))
    """

    @staticmethod
    def forward(
        ctx, w: torch.Tensor, m: torch.Tensor, alpha: torch.Tensor, u: torch.Tensor
    ) -> torch.Tensor:
        sign = torch.div(m, alpha).add_(1).div_(2).add_(u).floor_().clamp_(0, 1).mul_(2).sub_(1)
        ctx.save_for_backward(m, alpha, sign)
        return torch.mul(sign, alpha).add_(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        m, alpha, sign = ctx.saved_tensors
        inside = m.abs().le_(alpha)  # 1.0 / 0.0
        d_alpha = torch.addcmul(sign, torch.div(m, alpha), inside, value=-1).mul_(grad)
        return None, grad * inside, d_alpha.sum().reshape(alpha.shape), None


class LearnedBinarization(nn.Module):
    """The parametrization ``w -> w + U(m, s)`` attached to one weight."""

    def __init__(self, weight: torch.Tensor, rho: float) -> None:
        super().__init__()
        self.m = nn.Parameter(torch.zeros_like(weight))
        self.s = nn.Parameter(torch.zeros((), device=weight.device))
        self.register_buffer("alpha0", torch.zeros((), device=weight.device))
        self.rho = rho
        self.binarizing = False

    def alpha(self) -> torch.Tensor:
        return torch.clamp(self.alpha0 * torch.exp(self.rho * self.s), ALPHA_MIN, ALPHA_MAX)

    def start_binarizing(self) -> None:
        self.alpha0.fill_(self.m.detach().abs().mean())
        self.binarizing = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.binarizing:
            return w + self.m
        return ScaledBinarize.apply(w, self.m, self.alpha(), torch.rand_like(self.m))


class FedBATHook(ClientHook):
    """Attaches :class:`LearnedBinarization` to the named weights of any module."""

    def __init__(
        self, model: nn.Module, names: list[str], total_steps: int, rho: float, phi: float
    ) -> None:
        self.model, self.names = model, names
        self.switch_step = int(phi * total_steps)
        self.layers: dict[str, LearnedBinarization] = {}
        self.alphas: dict[str, torch.Tensor] = {}  # each layer's step size, fixed by latent()
        for name in names:
            module, attr = _owner(model, name)
            weight = getattr(module, attr)
            weight.requires_grad_(False)
            layer = LearnedBinarization(weight.detach(), rho)
            # unsafe: skips a trial forward per layer per client; w + U keeps w's shape/dtype
            parametrize.register_parametrization(module, attr, layer, unsafe=True)
            self.layers[name] = layer
        if self.switch_step == 0:
            self._switch()

    def _switch(self) -> None:
        for layer in self.layers.values():
            layer.start_binarizing()

    def after_step(self, step: int) -> None:
        if step + 1 == self.switch_step:
            self._switch()

    @torch.no_grad()
    def latent(self) -> dict[str, torch.Tensor]:
        """The learned ``m`` of every layer, the weights back as they were received."""
        out: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            if not layer.binarizing:
                layer.start_binarizing()
            self.alphas[name] = layer.alpha()
            out[name] = layer.m.detach().cpu()
            module, attr = _owner(self.model, name)
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
            getattr(module, attr).requires_grad_(True)
        return out

    @torch.no_grad()
    def encode_latent(self, latent: dict[str, torch.Tensor]) -> dict[str, Fields]:
        """The final draw of ``S(m, alpha)`` per layer, from ``m`` as the transforms left it."""
        out: dict[str, Fields] = {}
        for name, alpha in self.alphas.items():
            m = latent[name].to(alpha.device)
            out[name] = encode_scaled_signs(binarize(m, alpha, torch.rand_like(m)).bool(), alpha)
        return out


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


@register("fedbat")
class FedBAT(Compressor):
    """Learned 1-bit updates with per-layer learned step sizes (FedBAT)."""

    learns = True
    offers_latent = True

    def __init__(self, rho: float = 6.0, phi: float = 0.5, error_feedback: bool = True) -> None:
        super().__init__(error_feedback)
        check_range("rho", rho, 0.0, 100.0)
        check_range("phi", phi, 0.0, 1.0)
        self.rho, self.phi = float(rho), float(phi)

    def training_hook(self, model: nn.Module, names: list[str], total_steps: int) -> FedBATHook:
        return FedBATHook(model, names, total_steps, self.rho, self.phi)

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Fields:
        x = x.detach().to(torch.float32).cpu()
        alpha = x.abs().mean().clamp_min(torch.finfo(torch.float32).tiny)
        return encode_scaled_signs(
            binarize(x, alpha, torch.rand(x.shape, generator=generator)).bool(), alpha
        )

    def decode(self, fields: Fields, shape: torch.Size) -> torch.Tensor:
        return decode_scaled_signs(fields, shape)

    def max_payload_bytes(self, shape: tuple[int, ...]) -> int:
        numel = math.prod(shape)
        return scaled_signs_bytes(numel)

    def check_learned(self, fields: Fields) -> None:
        """A client's step size is clamped to [5e-4, 5e-2]: a larger one is forged."""
        low, high = _ALPHA_RANGE
        scale = fields["scale"]
        if not bool(((scale >= low) & (scale <= high)).all()):
            raise PacketError(
                f"step size {float(scale.max()):.3g} outside [{ALPHA_MIN}, {ALPHA_MAX}], "
                "the range FedBAT's local training gives"
            )

    def stats(self, fields: Fields) -> dict[str, float]:
        return {"alpha": float(fields["scale"][0])}
