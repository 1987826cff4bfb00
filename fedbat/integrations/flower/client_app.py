"""A Flower ClientApp whose train function is fedbat's local training.

The SuperNode's ``partition-id`` (node config) is the fedbat client it serves; it trains on
its own data when its node config names it (``data-root``, ``datamodule``: ``node_data.py``),
else on that partition of the configured dataset. Each train
message brings the round, the client, and the downlink it needs (the broadcasts it missed,
or the full model); the client rebuilds the weights it holds from what it kept,
trains with the uplink compressor's hook (FedBAT's learned binarization included), and
replies with the fedbat packet. What it keeps between rounds (the weights it holds, its
error-feedback residuals, the strategy's per-client state) stays on the node, as on a real
device: in its Flower context, or on its disk when its node config names a ``state-dir``
(``node_state.py``), where it survives a restart of the node or of the deployment.
"""

from __future__ import annotations

import functools
import json

import lightning as L
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import OmegaConf

from fedbat.assembly import Components, build_components
from fedbat.client import ClientJob, train_client
from fedbat.compressors import decode_update
from fedbat.compressors.update import SharedSeed
from fedbat.downlink import FULL, apply_broadcast
from fedbat.integrations.flower.node_data import node_data
from fedbat.integrations.flower.node_state import DiskState
from fedbat.integrations.flower.protocol import (
    RECORD,
    STATE,
    echo,
    pack_state,
    result_record,
    unpack_state,
)

app = ClientApp()
NODE_KEYS = ("partition-id", "data-root", "datamodule", "datamodule-args")  # what it trains on


def components(context: Context) -> Components:
    """The run's parts, as the server's are built (one device: a node trains alone), on the
    node's own data when its node config names it (``node_data.py``)."""
    node = tuple(str(context.node_config.get(k, "")) for k in NODE_KEYS)
    return _components(str(context.run_config["config"]), node)


@functools.lru_cache(maxsize=1)  # a warm ClientApp process serves many rounds
def _components(config_yaml: str, node: tuple[str, ...]) -> Components:
    cfg = OmegaConf.create(config_yaml)
    if cfg.trainer.get("threads"):
        torch.set_num_threads(int(cfg.trainer.threads))
    t = cfg.trainer
    fabric = L.Fabric(accelerator=t.accelerator, devices=1, precision=t.precision)
    own = node_data(dict(zip(NODE_KEYS, node, strict=True)), cfg)
    return build_components(cfg, fabric, data=own)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which fedbat client this node serves, and, when it holds its own data, how many
    samples it trains on (its weight in the server's average)."""
    partition = int(context.node_config["partition-id"])
    answer: dict = {"partition-id": partition}
    if own_data(context):  # the data alone: no model or training step to count samples
        cfg = OmegaConf.create(str(context.run_config["config"]))
        own = node_data(dict(context.node_config), cfg)
        answer["num-samples"] = own.client_size(partition) if own is not None else 0
    return Message(RecordDict({RECORD: ConfigRecord(answer)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    side = components(context)
    request = msg.content.config_records[RECORD]
    client, r = int(request["client"]), int(request["round"])
    partition = int(context.node_config["partition-id"])
    if client != partition:
        raise ValueError(f"asked to train client {client}; this node serves {partition}")
    disk = DiskState(context.node_config["state-dir"], client) if on_disk(context) else None
    if disk is not None:
        blob, version = disk.load(before=r)
    else:
        kept = context.state.config_records.get(STATE)
        blob, version = (bytes(kept["blob"]), int(kept["version"])) if kept else (b"", -1)
    stored_held, state = unpack_state(blob)
    held = receive(side, request, stored_held, version)
    names = set(side.task.state_dict())  # the model's; the rest is the strategy's
    if request.get("schedule"):
        side.schedule.load_state_dict(json.loads(str(request["schedule"])))
    job = ClientJob(
        client=client,
        round=r,
        held={k: v for k, v in held.items() if k in names},
        extra={k: v for k, v in held.items() if k not in names},
        state=state,
    )
    result = train_client(side.setup, job)
    if result.ok:  # the client keeps the weights it was sent, and its new state
        blob = pack_state(held, result.state)
        if disk is not None:
            disk.save(blob, r)
        else:
            context.state[STATE] = ConfigRecord({"blob": blob, "version": r})
    reply = result_record(result) | echo(request)
    return Message(RecordDict({RECORD: ConfigRecord(reply)}), reply_to=msg)


def own_data(context: Context) -> bool:
    """Whether this node trains on its own data (node config ``data-root`` or ``datamodule``)."""
    return any(str(context.node_config.get(k, "")) for k in ("data-root", "datamodule"))


def on_disk(context: Context) -> bool:
    """Whether this node keeps its state on its own disk (node config ``state-dir``)."""
    return bool(str(context.node_config.get("state-dir", "")))


def receive(
    side: Components, request: ConfigRecord, held: dict[str, torch.Tensor], version: int
) -> dict[str, torch.Tensor]:
    """The weights the server holds for this round (``w_hat`` and the strategy's broadcast
    state), from the full model or from the broadcasts this client missed, applied in order
    exactly as the server applied them."""
    if "full" in request:
        full, _ = decode_update(bytes(request["full"]), side.full_plan, FULL)
        return full
    start = int(request["version"])
    if version != start or not held:
        raise ValueError(f"holds the model of round {version}; the broadcasts start at {start}")
    for j, packet in enumerate(request["chain"], start):  # the broadcasts of rounds start...
        shared = SharedSeed(side.cfg.seed, j)
        decoded, _ = decode_update(bytes(packet), side.packet_plan, side.downlink, shared=shared)
        held = apply_broadcast(held, decoded)
    return held
