"""Local training of one client and the encoding of its update (DESIGN.md steps 2-4)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from compressors import Compressor, ErrorFeedback, TensorSpec, encode_update
from compressors.base import all_finite
from datamodules import FederatedDataModule
from fedbat.seeding import derive_seed, generator


@dataclass
class ClientResult:
    """What a client hands to the exchange: its packet and the facts the server weighs."""

    client: int
    data: bytes
    payload_bits: int
    num_samples: int
    train_loss: float
    compress_s: float
    residuals: dict[str, torch.Tensor]  # this client's error-feedback state after encoding
    failure: str = ""  # why the client sent nothing (its packet is then empty)

    @property
    def ok(self) -> bool:
        return not self.failure


@dataclass
class LocalTraining:
    """The client-side settings of a run."""

    epochs: int
    batch_size: int
    seed: int
    device: torch.device
    autocast: Callable[[], AbstractContextManager] = nullcontext
    fp16: bool = False  # 16-mixed precision: scale the loss against underflow


def train_client(
    task: torch.nn.Module,
    held: dict[str, torch.Tensor],
    dm: FederatedDataModule,
    client: int,
    round_idx: int,
    cfg: LocalTraining,
    plan: list[TensorSpec],
    uplink: Compressor,
    memory: ErrorFeedback | None,
) -> ClientResult:
    """Train ``client`` from the weights it holds and encode ``w_client - held``.

    ``task`` is a reused worker LightningModule on ``cfg.device``; all of this client's
    randomness (data order, FedBAT draws, dropout) is seeded by (seed, round, client).
    """
    seed = derive_seed(cfg.seed, round_idx, client)
    torch.manual_seed(seed)
    data_gen = torch.Generator().manual_seed(seed)
    task.load_state_dict(held)
    task.train()
    n = dm.client_size(client)
    steps = cfg.epochs * math.ceil(n / cfg.batch_size)
    hook = uplink.training_hook(task, [s.name for s in plan if s.compressed], steps)
    optimizer = task.configure_optimizers()
    scaler = torch.amp.GradScaler(cfg.device.type, enabled=cfg.fp16)
    loss_sum, step = torch.zeros((), device=cfg.device), 0
    for _epoch in range(cfg.epochs):
        for xb, yb in dm.client_batches(client, cfg.batch_size, data_gen, cfg.device):
            with cfg.autocast():
                loss = task.training_step((xb, yb), step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach()
            if hook is not None:
                hook.after_step(step)
            step += 1
    start = time.perf_counter()
    preencoded = hook.finalize() if hook is not None else None
    train_loss = float(loss_sum) / max(step, 1)
    state = task.state_dict()
    update = {k: (state[k].detach().cpu() - held[k]) for k in held}
    if not math.isfinite(train_loss) or not all(all_finite(u.float()) for u in update.values()):
        why = f"non-finite local training (loss {train_loss})"
        return ClientResult(client, b"", 0, n, train_loss, 0.0, {}, why)
    packet = encode_update(update, plan, uplink, generator(seed), memory, client, preencoded)
    residuals = memory.of(client) if memory is not None else {}
    return ClientResult(
        client,
        packet.data,
        packet.payload_bits,
        n,
        train_loss,
        time.perf_counter() - start,
        residuals,
    )
