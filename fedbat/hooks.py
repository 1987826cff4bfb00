"""Client hooks: what wraps a client's local training and its update before encoding.

One list per client, run in order: the strategy's (FedProx's proximal term, SCAFFOLD's
correction, a wrapper's update transform), then the uplink compressor's (FedBAT's learned
binarization). Flower's mods play the same part around a ClientApp.

A client's update passes through every hook's :meth:`ClientHook.transform` before it is
encoded. A compressor that encodes during training (FedBAT) hands its tensors over at that
point too: :meth:`ClientHook.latent` gives them as values, the transforms run on the whole
update, then :meth:`ClientHook.encode_latent` makes their fields. A learning compressor
whose hook cannot do that (``Compressor.offers_latent``) is refused beside a strategy that
transforms updates (``Strategy.transforms_update``), in one line, before any work.
"""

from __future__ import annotations

import torch

from fedbat.errors import ConfigError

Fields = dict[str, torch.Tensor]


class ClientHook:
    """Something that wraps a client's local training; every method is optional."""

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate, given the task's (default: unchanged)."""
        return loss

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Called after backward, before each local optimizer step."""

    def after_step(self, step: int) -> None:
        """Called after local optimizer step ``step`` (0-based)."""

    def latent(self) -> dict[str, torch.Tensor]:
        """Detach from the model (weights as they were received) and return, as values, the
        update of every tensor the hook encodes itself (FedBAT: its learned ``m``)."""
        return {}

    def encode_latent(self, latent: dict[str, torch.Tensor]) -> dict[str, Fields]:
        """The uplink fields of the tensors :meth:`latent` returned, after the transforms."""
        return {}

    def transform(self, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The update to send, given the one local training made (every tensor of the plan,
        as values; default: unchanged)."""
        return update

    def message(self, sent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors this client adds to its packet, given the update it sends as the server
        will decode it (SCAFFOLD: the change of its control variate)."""
        return {}

    def client_state(self) -> dict[str, torch.Tensor]:
        """The client's own state to keep until it is sampled again (SCAFFOLD: its control
        variate); called after :meth:`message`."""
        return {}


def check_transform_point(compressor: object, strategy: object) -> None:
    """Refuse, in one line, an update transform (``strategy.transforms_update``) beside an
    uplink compressor that encodes during training without offering its latent update: the
    transform would silently not apply to what it encodes."""
    learns, offers = (
        getattr(compressor, "learns", False),
        getattr(compressor, "offers_latent", False),
    )
    if getattr(strategy, "transforms_update", False) and learns and not offers:
        raise ConfigError(
            f"compressor={getattr(compressor, 'name', '?')}: it encodes during local training "
            "and offers no point for the update transform of strategy.wrap; use a post-hoc "
            "compressor, or give its hook latent() and encode_latent()"
        )
