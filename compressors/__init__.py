"""The compressor registry and every compressor; the wire format; error feedback. Every
module of this package is imported at start, so a new compressor file registers itself.

>>> from fedbat.compressors import available
>>> " ".join(available())
'bf16 drive eden ef_signsgd fedbat fp16 int8 nf4 none powersgd qsgd randk signsgd terngrad topk'
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

import torch

from fedbat.compressors.base import Compressor, Fields
from fedbat.compressors.memory import Memory
from fedbat.compressors.packet import Packet
from fedbat.compressors.plan import TensorSpec, wire_plan
from fedbat.compressors.registry import COMPRESSORS, register
from fedbat.compressors.update import (
    SharedSeed,
    decode_fields,
    decode_update,
    encode_fields,
    encode_update,
)
from fedbat.errors import ConfigError
from fedbat.seeding import derive_seed, generator

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "COMPRESSORS",
    "Compressor",
    "Fields",
    "Memory",
    "Packet",
    "TensorSpec",
    "available",
    "build",
    "build_pair",
    "decode_fields",
    "decode_update",
    "encode_fields",
    "encode_update",
    "register",
    "roundtrip",
    "wire_plan",
]


def available() -> list[str]:
    """The registered compressor names."""
    return COMPRESSORS.available()


def build(spec: str | Mapping[str, Any], key: str = "compressor") -> Compressor:
    """A compressor from a name or a ``{name: ..., **params}`` mapping."""
    if isinstance(spec, str):
        return COMPRESSORS.get(spec, key=key)
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"{key}={spec!r}: must be a compressor name or a mapping with 'name'; "
            f"available: {', '.join(available())}"
        )
    params = {k: v for k, v in dict(spec).items() if k not in ("uplink", "downlink")}
    if "name" not in params:
        raise ConfigError(f"{key}: missing 'name' (available: {', '.join(available())})")
    return COMPRESSORS.get(params.pop("name"), key=key, **params)


def build_pair(cfg: Mapping[str, Any]) -> tuple[Compressor, Compressor]:
    """(uplink, downlink) from the ``compressor`` config group: the group's compressor serves
    both directions unless ``uplink`` / ``downlink`` name another (a name or a mapping).

    >>> build_pair({"name": "fedbat", "rho": 6.0, "downlink": "none"})
    (FedBAT(name='fedbat', error_feedback=True), NoCompression(name='none', error_feedback=False))
    """
    main = build(cfg)
    out = []
    for direction in ("uplink", "downlink"):
        override = cfg.get(direction)
        out.append(main if override is None else build(override, key=f"compressor.{direction}"))
    return out[0], out[1]


def roundtrip(
    spec: str | Mapping[str, Any], x: torch.Tensor, seed: int = 0, client: int = 0, round: int = 0
) -> torch.Tensor:
    """What a receiver decodes from one encoding of ``x`` by the compressor ``spec`` (a name
    or a mapping, as in the config), through real packed bytes; the encoder's randomness is
    a client's of (``seed``, ``round``, ``client``), its shared randomness that link's; a
    compressor that keeps state encodes from none (a sender's first packet).

    >>> roundtrip("signsgd", torch.tensor([0.5, -1.5]))
    tensor([ 1., -1.])
    """
    compressor = build(spec)
    plan = [TensorSpec("x", x.shape, torch.float32, True)]
    gen = generator(derive_seed(seed, round, client))
    shared = SharedSeed(seed, round, client)
    packet = encode_update({"x": x.to(torch.float32)}, plan, compressor, gen, shared=shared)
    return decode_update(packet.data, plan, compressor, shared=shared)[0]["x"]
