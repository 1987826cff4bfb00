"""A Flower ClientApp whose train function is fedbat's local training.

The SuperNode's ``partition-id`` (node config) is the fedbat client it serves. Each train
message brings the round, the client, and the downlink it needs (the broadcasts it missed,
or the full model); the client rebuilds the weights it holds from its Flower context,
trains with the uplink compressor's hook (FedBAT's learned binarization included), and
replies with the fedbat packet. What it keeps between rounds (the weights it holds, its
error-feedback residuals, the strategy's per-client state) stays in the node's context
state, as on a real device.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass

import lightning as L
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig, OmegaConf

from fedbat.assembly import build_datamodule, build_plan, build_task, place
from fedbat.client import (
    ClientData,
    ClientJob,
    ClientSetup,
    LocalTraining,
    input_conversion,
    train_client,
)
from fedbat.compressors import Compressor, ErrorFeedback, TensorSpec, build_pair, decode_update
from fedbat.compressors.packet import frozen_specs
from fedbat.contract import ServerSchedule
from fedbat.downlink import FULL, apply_broadcast
from fedbat.integrations.flower.protocol import (
    RECORD,
    STATE,
    pack_state,
    result_record,
    unpack_state,
)
from fedbat.strategies import Strategy
from fedbat.strategies import build as build_strategy

app = ClientApp()
PARTS = ("held", "residual", "state")


@dataclass
class ClientSide:
    """Everything a client builds once from the run's config."""

    cfg: DictConfig
    data: ClientData
    task: L.LightningModule
    plan: list[TensorSpec]
    packet_plan: list[TensorSpec]
    full_plan: list[TensorSpec]  # the model a client first receives, frozen tensors too
    uplink: Compressor
    downlink: Compressor
    strategy: Strategy
    local: LocalTraining
    schedule: ServerSchedule  # set from each request: the server owns it

    @functools.cached_property
    def setup(self) -> ClientSetup:
        return ClientSetup(
            task=self.task,
            data=self.data,
            local=self.local,
            plan=self.plan,
            uplink=self.uplink,
            schedule=self.schedule,
            strategy=self.strategy,
        )


@functools.lru_cache(maxsize=1)  # a warm ClientApp process serves many rounds
def client_side(config_yaml: str) -> ClientSide:
    cfg = OmegaConf.create(config_yaml)
    if cfg.trainer.get("threads"):
        torch.set_num_threads(int(cfg.trainer.threads))
    t = cfg.trainer
    fabric = L.Fabric(accelerator=t.accelerator, devices=1, precision=t.precision)
    data = build_datamodule(cfg)
    task = place(build_task(cfg, data), fabric)
    schedule = ServerSchedule(copy.deepcopy(task))
    plan = build_plan(cfg, task, data, input_conversion(fabric))
    uplink, downlink = build_pair(OmegaConf.to_container(cfg.compressor, resolve=True))
    strategy = build_strategy(OmegaConf.to_container(cfg.strategy, resolve=True))
    travel = {s.name for s in plan}
    params = {n: p for n, p in copy.deepcopy(task).cpu().named_parameters() if n in travel}
    strategy.setup(params, data.num_clients)
    f = cfg.fed
    local = LocalTraining(f.local_epochs, f.batch_size, cfg.seed, fabric.device, fabric)
    packet_plan = plan + strategy.extra_plan(plan)
    full_plan = packet_plan + frozen_specs(task, plan)
    return ClientSide(
        cfg, data, task, plan, packet_plan, full_plan, uplink, downlink, strategy, local, schedule
    )


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which fedbat client this node serves."""
    partition = int(context.node_config["partition-id"])
    return Message(RecordDict({RECORD: ConfigRecord({"partition-id": partition})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    side = client_side(str(context.run_config["config"]))
    request = msg.content.config_records[RECORD]
    client, r = int(request["client"]), int(request["round"])
    partition = int(context.node_config["partition-id"])
    if client != partition:
        raise ValueError(f"asked to train client {client}; this node serves {partition}")
    kept = context.state.config_records.get(STATE)
    stored = unpack_state(bytes(kept["blob"]) if kept else b"", PARTS)
    version = int(kept["version"]) if kept else -1
    held = receive(side, request, stored["held"], version)
    names = set(side.task.state_dict())  # the model's; the rest is the strategy's
    if request.get("schedule"):
        side.schedule.load_state_dict(json.loads(str(request["schedule"])))
    job = ClientJob(
        client=client,
        round=r,
        held={k: v for k, v in held.items() if k in names},
        extra={k: v for k, v in held.items() if k not in names},
        state=stored["state"],
        memory=ErrorFeedback(stored["residual"]) if side.uplink.needs_memory else None,
    )
    result = train_client(side.setup, job)
    if result.ok:  # the client keeps the weights it was sent, and its new state
        parts = {"held": held, "residual": result.residuals, "state": result.state}
        context.state[STATE] = ConfigRecord({"blob": pack_state(parts), "version": r})
    return Message(RecordDict({RECORD: ConfigRecord(result_record(result))}), reply_to=msg)


def receive(
    side: ClientSide, request: ConfigRecord, held: dict[str, torch.Tensor], version: int
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
    for packet in request["chain"]:
        decoded, _ = decode_update(bytes(packet), side.packet_plan, side.downlink)
        held = apply_broadcast(held, decoded)
    return held
