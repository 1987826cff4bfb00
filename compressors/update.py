"""Encoding a whole model update into a packet and decoding it back, for one direction.

This is where the policy (which tensors are compressed), the compressor's math, error
feedback and the wire format meet; both the clients (uplink) and the server (downlink) use it.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch

from fedbat.compressors.base import Compressor, Fields, all_finite, all_finite_in, expect
from fedbat.compressors.memory import Memory
from fedbat.compressors.packet import Packet, pack, unpack
from fedbat.compressors.plan import TensorSpec
from fedbat.errors import PacketError
from fedbat.seeding import DOWNLINK, generator

SHARED = 0x5EED  # the first part of every shared seed: never equal to a run's own draws


@dataclass(frozen=True)
class SharedSeed:
    """The randomness both ends of one packet derive and never send (rand-k's indices,
    DRIVE's rotation): a function of the run seed, the round and the holder (a client id;
    :data:`~fedbat.seeding.DOWNLINK` for the server's broadcast), and each tensor's name."""

    seed: int
    round: int
    holder: int = DOWNLINK

    def generator(self, name: str) -> torch.Generator:
        return generator(SHARED, self.seed, self.round, self.holder, zlib.crc32(name.encode()))


NO_SHARED = SharedSeed(0, 0)  # for a packet outside a run (tests, ``roundtrip``)


def encode_update(
    update: dict[str, torch.Tensor],
    plan: list[TensorSpec],
    compressor: Compressor,
    generator: torch.Generator,
    memory: Memory | None = None,
    holder: str | int = "server",
    shared: SharedSeed = NO_SHARED,
) -> Packet:
    """``update`` (CPU tensors by name) -> packet; ``memory`` is ``holder``'s: error
    feedback on compressed tensors and the compressor's own state; ``shared`` is the link's
    shared randomness."""
    fields = encode_fields(update, plan, compressor, generator, memory, holder, shared=shared)
    return pack(fields, compressor)


def encode_fields(
    update: dict[str, torch.Tensor],
    plan: list[TensorSpec],
    compressor: Compressor,
    generator: torch.Generator,
    memory: Memory | None = None,
    holder: str | int = "server",
    preencoded: dict[str, Fields] | None = None,
    shared: SharedSeed = NO_SHARED,
) -> dict[str, Fields]:
    """:func:`encode_update` before packing: the fields of every tensor of ``plan``;
    ``preencoded`` fields (from a training hook) are used as they are."""
    preencoded = preencoded or {}
    fields: dict[str, Fields] = {}
    for spec in plan:
        if spec.name in preencoded:
            fields[spec.name] = preencoded[spec.name]
        elif spec.compressed:
            x = update[spec.name]  # the identity keeps the tensor's dtype; the rest take fp32
            x = x if compressor.lossless else x.to(torch.float32)
            feedback = memory is not None and compressor.needs_memory
            if feedback:
                x = memory.compensate(holder, spec.name, x)
            link = _Link(compressor, shared, spec.name)
            if compressor.keeps_state:
                last = memory.state(holder, spec.name) if memory is not None else {}
                fields[spec.name], state = link.encode(x, generator, state=last)
                if memory is not None:
                    memory.keep(holder, spec.name, state)
            else:
                fields[spec.name] = link.encode(x, generator)
            if feedback:
                memory.update(holder, spec.name, x, link.decode(fields[spec.name], spec.shape))
        else:
            raw = update[spec.name].detach().reshape(-1)
            fields[spec.name] = {"raw": raw if raw.dtype == spec.dtype else raw.to(spec.dtype)}
    return fields


def decode_update(
    data: bytes,
    plan: list[TensorSpec],
    compressor: Compressor,
    learned: Collection[str] = (),
    shared: SharedSeed = NO_SHARED,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Packet bytes -> (update by tensor name, per-tensor stats). Raises PacketError on
    anything malformed or non-finite: the caller rejects the packet. The fields of the
    ``learned`` tensors (those a client's training hook encodes) are checked against what
    honest training gives, too; ``shared`` is the randomness the sender's link derived."""
    return decode_fields(unpack(data, plan, compressor), plan, compressor, learned, shared)


def decode_fields(
    fields: dict[str, Fields],
    plan: list[TensorSpec],
    compressor: Compressor,
    learned: Collection[str] = (),
    shared: SharedSeed = NO_SHARED,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """:func:`decode_update` after unpacking (a client decodes its own fields this way, to
    know the update the server will see)."""
    update: dict[str, torch.Tensor] = {}
    stats: dict[str, float] = {}
    for spec in plan:
        fs = fields[spec.name]
        try:
            if spec.compressed:
                read = _ReadTracking(fs)
                update[spec.name] = _Link(compressor, shared, spec.name).decode(read, spec.shape)
                if compressor.lossless and update[spec.name].dtype != spec.dtype:
                    raise PacketError(
                        f"dtype {update[spec.name].dtype}, the tensor's is {spec.dtype}"
                    )
                if extra := sorted(set(fs) - read.read):
                    raise PacketError(f"unexpected field(s) {extra} for {compressor.name!r}")
                if spec.name in learned:
                    compressor.check_learned(fs)
                stats.update({f"{k}/{spec.name}": v for k, v in compressor.stats(fs).items()})
            else:
                if set(fs) != {"raw"}:
                    raise PacketError(f"fields {sorted(fs)}, expected ['raw']")
                raw = expect(fs, "raw", spec.dtype, spec.numel, finite=False)
                update[spec.name] = raw.reshape(spec.shape)
        except PacketError as err:
            raise PacketError(f"{spec.name}: {err}") from None
    raws = [s.name for s in plan if not s.compressed]
    if not all_finite_in(update[n] for n in raws):
        bad = next(n for n in raws if update[n].is_floating_point() and not all_finite(update[n]))
        raise PacketError(f"{bad}: field 'raw': non-finite values")
    return update, stats


class _ReadTracking(dict):
    """Fields that remember which keys ``decode`` read: a field it never read (an extra
    value, or two alternative encodings at once) makes the packet invalid."""

    def __init__(self, fields: Fields) -> None:
        super().__init__(fields)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: torch.Tensor | None = None) -> torch.Tensor | None:  # type: ignore[override]
        self.read.add(key)
        return super().get(key, default)


@dataclass(frozen=True)
class _Link:
    """One tensor's encode and decode, handing a compressor that draws shared randomness
    (``Compressor.shared_randomness``) the same generator on both sides."""

    compressor: Compressor
    shared: SharedSeed
    name: str

    def encode(self, x: torch.Tensor, generator: torch.Generator, **state: Fields) -> Any:
        """The compressor's fields, or (fields, next state) when it is given ``state=``."""
        if self.compressor.shared_randomness:
            shared = self.shared.generator(self.name)
            return self.compressor.encode(x, generator, shared=shared, **state)
        return self.compressor.encode(x, generator, **state)

    def decode(self, fields: Fields, shape: torch.Size) -> torch.Tensor:
        if self.compressor.shared_randomness:
            shared = self.shared.generator(self.name)
            return self.compressor.decode(fields, shape, shared=shared)
        return self.compressor.decode(fields, shape)
