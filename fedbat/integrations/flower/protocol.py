"""The fedbat messages on Flower: what the server sends a client, what the client replies,
and what the client keeps between rounds. Every value is a plain Flower ConfigRecord value
(ints, floats, strings, bytes); the model travels only as fedbat packets.

>>> from fedbat.client import ClientResult
>>> res = ClientResult(client=3, data=b"packet", payload_bits=48, num_samples=10,
...                    train_loss=0.5, compress_s=0.01, logs={"acc": 0.5})
>>> asked = Asked(client=3, num_samples=10, round=2, nonce="n2", max_bytes=100)
>>> reply = result_record(res) | echo({"round": 2, "nonce": "n2"})
>>> back = result_from_record(reply, asked)
>>> (back.client, back.data, back.payload_bits, back.num_samples, back.logs)
(3, b'packet', 48, 10, {'acc': 0.5})
>>> result_from_record(reply | {"client": 4}, asked).failure
'reply for client 4, expected 3'
>>> result_from_record({}, asked).failure  # no fedbat record at all
'reply for client None, expected 3'
>>> result_from_record(reply | {"nonce": "n1"}, asked).failure  # an earlier round's reply
"reply to another request (round 2, nonce 'n1'): replayed or stale"
>>> result_from_record(reply | {"round": 1}, asked).failure
"reply to another request (round 1, nonce 'n2'): replayed or stale"
>>> result_from_record(reply | {"packet": bytes(101)}, asked).failure
'a packet of 101 bytes; at most 100 fit this model'
>>> result_from_record({"client": 3, "round": 2, "nonce": "n2", "packet": b"x"}, asked).failure
"malformed reply (KeyError: 'logs')"
>>> result_from_record(reply | {"train_loss": float("nan")}, asked).failure
'malformed reply (packet, logs or train_loss)'
>>> result_from_record(reply | {"logs": '{"acc": "high"}'}, asked).failure
'malformed reply (packet, logs or train_loss)'
>>> result_from_record(reply | {"failure": "out of memory"}, asked).failure
'out of memory'
>>> result_from_record(reply | {"num_samples": 10**6}, asked).failure  # its weight
'claims 1000000 samples; its partition has 10'
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedbat.client import ClientResult
from fedbat.clientstate import ClientState, under

RECORD = "fedbat"  # the ConfigRecord of every fedbat message, request or reply
STATE = "fedbat-state"  # the ConfigRecord a client keeps in its Flower context


def result_record(res: ClientResult) -> dict[str, Any]:
    """A client's reply: its packet and the facts the server weighs."""
    return {
        "client": res.client,
        "packet": res.data,
        "payload_bits": res.payload_bits,
        "num_samples": res.num_samples,
        "train_loss": res.train_loss,
        "compress_s": res.compress_s,
        "failure": res.failure,
        "logs": json.dumps(res.logs),
    }


def echo(request: Mapping[str, Any]) -> dict[str, Any]:
    """What a reply repeats of its request, so that the server can tell it answers this
    request: the round, and the request's one-time nonce."""
    return {"round": int(request["round"]), "nonce": str(request["nonce"])}


@dataclass(frozen=True)
class Asked:
    """What the server asked one client, and what it accepts back."""

    client: int
    num_samples: int  # the client's partition size: its weight is not its to set
    round: int
    nonce: str
    max_bytes: int  # the largest packet this model's updates can make


def failed(client: int, why: str) -> ClientResult:
    """A client that sent nothing usable, and why (the server rejects it alone)."""
    return ClientResult(client=client, failure=why)


def result_from_record(record: Mapping[str, Any], asked: Asked) -> ClientResult:
    """Trust nothing from the wire: a reply for another client or another request (a replay,
    a stale round), too large, or of the wrong shape is a failed client, with why."""
    client, num_samples = asked.client, asked.num_samples
    if record.get("client") != client:
        return failed(client, f"reply for client {record.get('client')!r}, expected {client}")
    if (record.get("round"), record.get("nonce")) != (asked.round, asked.nonce):
        got = f"round {record.get('round')!r}, nonce {record.get('nonce')!r}"
        return failed(client, f"reply to another request ({got}): replayed or stale")
    if record.get("failure"):
        return failed(client, str(record["failure"])[:300])
    if isinstance(record.get("packet"), bytes) and len(record["packet"]) > asked.max_bytes:
        size = len(record["packet"])
        return failed(client, f"a packet of {size} bytes; at most {asked.max_bytes} fit this model")
    try:
        packet, logs = record["packet"], json.loads(record["logs"])
        facts = [int(record[k]) for k in ("payload_bits", "num_samples")]
        loss, secs = float(record["train_loss"]), float(record["compress_s"])
    except (KeyError, TypeError, ValueError) as err:
        return failed(client, f"malformed reply ({type(err).__name__}: {err})")
    ok_logs = isinstance(logs, dict) and all(isinstance(v, int | float) for v in logs.values())
    if not isinstance(packet, bytes) or not ok_logs or not math.isfinite(loss):
        return failed(client, "malformed reply (packet, logs or train_loss)")
    if facts[1] != num_samples:
        return failed(client, f"claims {facts[1]} samples; its partition has {num_samples}")
    return ClientResult(
        client=client,
        data=packet,
        payload_bits=facts[0],
        num_samples=facts[1],
        train_loss=loss,
        compress_s=secs,
        logs={**logs},
    )


def pack_state(held: Mapping[str, torch.Tensor], state: ClientState) -> bytes:
    """What a client keeps between rounds (the weights it holds and its own state) as one
    safetensors blob, the state under the key scheme of ``fedbat/clientstate.py``."""
    flat = {f"{HELD}{k}": v for k, v in held.items()} | state.flat()
    return st_save({k: v.contiguous() for k, v in flat.items()})


def unpack_state(blob: bytes) -> tuple[dict[str, torch.Tensor], ClientState]:
    flat = st_load(blob) if blob else {}
    return under(flat, HELD), ClientState.from_flat(flat)


HELD = "held/"
