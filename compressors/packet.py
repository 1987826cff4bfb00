"""The wire format: a model update as real bytes (safetensors container, never pickle).

Layout (version 1)
------------------
A safetensors file whose tensors are named ``"<tensor name>/<field>"``:

* compressed tensors carry their compressor's fields (e.g. ``conv.weight/signs`` uint8,
  ``conv.weight/scale`` fp32 [1]);
* every other tensor (BatchNorm affine and running statistics, biases, small tensors)
  travels as ``"<tensor name>/raw"`` in its own dtype (fp32, or int64 for counters).

Header metadata: ``format = "fedbat.packet"``, ``version = "1"``, ``compressor = <name>``.
The receiver trusts nothing from the packet: names, dtypes and sizes are checked against the
receiver's own :class:`TensorSpec` plan.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatch

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from fedbat.compressors.base import Compressor, Fields
from fedbat.errors import ConfigError, PacketError

FORMAT, VERSION = "fedbat.packet", "1"
COMPRESSIBLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model's state: how it travels."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    compressed: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def module_types(names: Sequence[str]) -> tuple[type[nn.Module], ...]:
    """``torch.nn`` module classes by name (``["Linear", "Embedding"]``); unknown names fail
    in one line."""
    out = []
    for name in names:
        cls = getattr(nn, str(name), None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ConfigError(f"policy.modules: {name!r} is not a torch.nn module class")
        out.append(cls)
    return tuple(out)


def wire_plan(
    model: nn.Module,
    min_numel: int = 100,
    modules: Sequence[type[nn.Module]] = COMPRESSIBLE,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list[TensorSpec]:
    """The compression policy: the ``weight`` of every module of the ``modules`` types, and
    every parameter whose name matches an ``include`` pattern (fnmatch), unless it matches
    an ``exclude`` pattern or has fewer than ``min_numel`` elements, is compressed;
    everything else in the state dict (BN, biases, buffers, small tensors) travels raw.

    >>> plan = wire_plan(nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 50)), 100, [nn.Embedding])
    >>> [(s.name, s.compressed) for s in plan]
    [('0.weight', True), ('1.weight', False), ('1.bias', False)]
    """
    chosen = {
        f"{mod_name}.weight" if mod_name else "weight"
        for mod_name, mod in model.named_modules()
        if isinstance(mod, tuple(modules))
        and isinstance(getattr(mod, "weight", None), torch.Tensor)
    }
    chosen |= {n for n, _ in model.named_parameters() if any(fnmatch(n, p) for p in include)}
    params = dict(model.named_parameters())
    compressible = {
        n
        for n in chosen
        if n in params
        and params[n].is_floating_point()
        and params[n].numel() >= min_numel
        and not any(fnmatch(n, p) for p in exclude)
    }
    return [
        TensorSpec(name, t.shape, t.dtype, name in compressible)
        for name, t in model.state_dict().items()
    ]


HEADER_BYTES_PER_FIELD = 128  # a safetensors header entry: dtype, shape, offsets, padding


def max_packet_bytes(plan: list[TensorSpec], compressor: Compressor) -> int:
    """The largest packet ``compressor`` can produce for ``plan``: each tensor's payload
    bound, plus a header entry for up to two fields per tensor and the metadata. Anything
    larger is rejected before parsing."""
    payload = sum(
        compressor.max_payload_bytes(s.numel) if s.compressed else s.numel * s.dtype.itemsize
        for s in plan
    )
    header = sum(2 * (len(s.name) + HEADER_BYTES_PER_FIELD) for s in plan)
    return payload + header + 512


@dataclass(frozen=True)
class Packet:
    """An encoded update: the bytes that travel and the fields they hold."""

    data: bytes
    payload_bits: int

    @property
    def bits(self) -> int:
        return 8 * len(self.data)


def pack(fields: dict[str, Fields], compressor: Compressor) -> Packet:
    """Serialise ``{tensor name: fields}`` into one packet."""
    flat = {
        f"{name}/{key}": t.contiguous().cpu()
        for name, fs in fields.items()
        for key, t in fs.items()
    }
    meta = {"format": FORMAT, "version": VERSION, "compressor": compressor.name}
    payload = sum(t.numel() * t.element_size() * 8 for t in flat.values())
    return Packet(st_save(flat, metadata=meta), payload)


def unpack(data: bytes, plan: list[TensorSpec], compressor: Compressor) -> dict[str, Fields]:
    """Parse and check the container: size, header, format version, compressor, names."""
    if not data:
        raise PacketError("empty packet")
    limit = max_packet_bytes(plan, compressor)
    if len(data) > limit:
        raise PacketError(f"packet of {len(data)} bytes exceeds the {limit} limit")
    try:
        meta = read_metadata(data)
        flat = st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as err:
        raise PacketError(f"unreadable packet: {err}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise PacketError(
            f"unsupported packet format {meta.get('format')!r} v{meta.get('version')!r}"
        )
    if meta.get("compressor") != compressor.name:
        raise PacketError(
            f"packet compressor {meta.get('compressor')!r}, expected {compressor.name!r}"
        )
    fields: dict[str, Fields] = {s.name: {} for s in plan}
    for key, t in flat.items():
        name, _, field = key.rpartition("/")
        if name not in fields:
            raise PacketError(f"unexpected tensor {name!r} in packet")
        fields[name][field] = t
    return fields


def read_metadata(data: bytes) -> dict[str, str]:
    """The string metadata of a safetensors container (its JSON header's ``__metadata__``).

    The header is parsed strictly: a key given twice (which JSON readers resolve
    differently) makes the container unreadable.
    """
    n = int.from_bytes(data[:8], "little")
    if len(data) < 8 or n > len(data) - 8:
        raise ValueError(f"header of {n} bytes in a {len(data)}-byte container")
    header = json.loads(data[8 : 8 + n], object_pairs_hook=_unique_keys)
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header.get("__metadata__") or {}


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r} in header")
    return dict(pairs)
