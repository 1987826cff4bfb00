"""What one client keeps between the rounds it is sampled in, as one object.

Its parts are its error-feedback residuals, its strategy's state (SCAFFOLD's ``c_i``) and
the state its uplink compressor keeps of its own; each part is keyed by tensor name. It is
persisted flat under one key scheme, ``<part>/<tensor name>``, by the client store
(``fedbat/clientstore.py``) and by a Flower node alike.

>>> state = ClientState(residuals={"w": torch.ones(2)})
>>> state.flat()
{'residual/w': tensor([1., 1.])}
>>> ClientState.from_flat(state.flat()) == state, bool(ClientState())
(True, False)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import torch

Tensors = dict[str, torch.Tensor]


@dataclass(eq=False)
class ClientState:
    """A client's own state; each field's ``part`` metadata is its persisted key prefix."""

    residuals: Tensors = field(default_factory=dict, metadata={"part": "residual"})
    strategy: Tensors = field(default_factory=dict, metadata={"part": "state"})
    compressor: Tensors = field(default_factory=dict, metadata={"part": "compressor"})

    def flat(self) -> Tensors:
        return {f"{part}/{k}": v for part, tensors in self._parts() for k, v in tensors.items()}

    @classmethod
    def from_flat(cls, flat: Mapping[str, torch.Tensor]) -> ClientState:
        """The state persisted by :meth:`flat`; keys under no part are ignored."""
        return cls(**{f.name: under(flat, f.metadata["part"] + "/") for f in fields(cls)})

    def _parts(self) -> list[tuple[str, Tensors]]:
        return [(f.metadata["part"], getattr(self, f.name)) for f in fields(self)]

    def __bool__(self) -> bool:
        return any(tensors for _, tensors in self._parts())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClientState):
            return NotImplemented
        mine, theirs = self.flat(), other.flat()
        return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def under(tensors: Mapping[str, torch.Tensor], prefix: str) -> Tensors:
    """The tensors whose key starts with ``prefix``, keyed by the rest."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
