"""The compressor interface: pure per-tensor ``encode``/``decode`` and an optional hook into
local training (``fedbat/hooks.py``). State (error-feedback residuals, a compressor's own
state between rounds) is kept apart, in ``compressors.memory``: a compressor that keeps state
receives its last state and returns the next one, and never holds it itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from fedbat.errors import ConfigError, PacketError
from fedbat.hooks import ClientHook, Fields

__all__ = ["Compressor", "Fields", "all_finite", "all_finite_in", "expect", "float32_norm"]


class Compressor:
    """Base class. Subclasses implement :meth:`encode` and :meth:`decode` on CPU tensors."""

    name: str = "?"
    lossless: ClassVar[bool] = False
    learns: ClassVar[bool] = False  # its training hook encodes the plan's compressed tensors
    offers_latent: ClassVar[bool] = False  # that hook hands them to update transforms first
    # encode and decode take ``shared=``: a generator both ends derive, never sent
    shared_randomness: ClassVar[bool] = False
    # encode takes ``state=`` (its fields from this sender's last encode of the tensor, {} at
    # first) and returns ``(fields, next state)``; :meth:`state_plan` names what it keeps
    keeps_state: ClassVar[bool] = False

    def __init__(self, error_feedback: bool = False) -> None:
        if not isinstance(error_feedback, bool):
            raise ConfigError(f"error_feedback={error_feedback!r}: must be true or false")
        self.error_feedback = error_feedback

    @property
    def needs_memory(self) -> bool:
        """Whether this link keeps error-feedback residuals: the one rule, everywhere (asked
        for, and lossy: the identity leaves nothing to feed back)."""
        return self.error_feedback and not self.lossless

    @property
    def remembers(self) -> bool:
        """Whether a sender on this link keeps anything between packets (residuals or the
        compressor's own state)."""
        return self.needs_memory or self.keeps_state

    def state_plan(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The state kept for a tensor of ``shape``: (shape, dtype) by field name; a stored
        state that does not match it is refused as damaged."""
        return {}

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> Fields:
        """fp32 tensor -> the compact tensors that travel (fields)."""
        raise NotImplementedError

    def decode(self, fields: Fields, shape: torch.Size) -> torch.Tensor:
        """Fields -> fp32 tensor of ``shape``; raises PacketError on malformed fields."""
        raise NotImplementedError

    def max_payload_bytes(self, shape: tuple[int, ...]) -> int:
        """The most bytes :meth:`encode` produces for a tensor of ``shape``: the receiver
        derives its packet size limit from it (default: fp32, never more)."""
        return 4 * math.prod(shape)

    def training_hook(
        self, model: nn.Module, names: list[str], total_steps: int
    ) -> ClientHook | None:
        """Attach to local training of ``model``'s tensors ``names``; post-hoc compressors
        return None."""
        return None

    def check_learned(self, fields: Fields) -> None:
        """Fields that :meth:`training_hook` produced (not :meth:`encode`): raise PacketError
        where they leave the range that honest local training gives (FedBAT's step sizes)."""

    def stats(self, fields: Fields) -> dict[str, float]:
        """Per-tensor figures worth logging (e.g. FedBAT's learned step size)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, error_feedback={self.error_feedback})"


def expect(
    fields: Fields, key: str, dtype: torch.dtype, numel: int, finite: bool = True
) -> torch.Tensor:
    """Fetch field ``key`` and check its dtype, size, rank and (``finite``) finiteness: a
    caller that checks many fields' finiteness together (:func:`all_finite_in`) says so."""
    t = fields.get(key)
    if t is None:
        raise PacketError(f"missing field {key!r} (have {sorted(fields)})")
    if t.dtype != dtype:
        raise PacketError(f"field {key!r}: dtype {t.dtype}, expected {dtype}")
    if t.dim() != 1 or t.numel() != numel:
        raise PacketError(f"field {key!r}: shape {tuple(t.shape)}, expected ({numel},)")
    if finite and t.is_floating_point() and not all_finite(t):
        raise PacketError(f"field {key!r}: non-finite values")
    return t


def all_finite(t: torch.Tensor) -> bool:
    """True when every element is finite. A NaN or inf anywhere makes the sum non-finite, and
    the sum is several times faster than ``isfinite().all()`` (a Python float's check, not
    a tensor's: a round checks thousands of small tensors); sums that overflow (values near
    1e38) are rejected too, which no sane update has."""
    return math.isfinite(t.sum().item())


def all_finite_in(tensors: Iterable[torch.Tensor]) -> bool:
    """:func:`all_finite` of every floating tensor of ``tensors``, in a few calls instead of
    two a tensor (a cross-device round checks a model's worth of small tensors a client):
    their float32 norms, finite only when every value is. Where they are not (or overflow,
    past 1.8e19), or for float64, each tensor's own check decides.

    >>> all_finite_in([torch.ones(3), torch.tensor([1e30]), torch.arange(3)])
    True
    >>> all_finite_in([torch.ones(3), torch.tensor([1.0, math.nan], dtype=torch.float16)])
    False
    """
    floats = [t for t in tensors if t.is_floating_point()]
    together = float32_norm(floats)
    if together is not None and math.isfinite(together):
        return True
    return all(all_finite(t) for t in floats)


def float32_norm(tensors: list[torch.Tensor]) -> float | None:
    """The L2 norm of all of the floating ``tensors`` together, from their float32 norms
    taken in one call; None where one is float64 (it cannot be narrowed).

    >>> float32_norm([torch.tensor([3.0]), torch.tensor([4.0], dtype=torch.float16)])
    5.0
    """
    if any(t.dtype == torch.float64 for t in tensors):
        return None
    if not tensors:
        return 0.0
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return float(torch.linalg.vector_norm(torch.stack(norms), dtype=torch.float64))
