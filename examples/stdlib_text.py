"""Federated next-byte prediction on real text every machine has: the Python standard
library's own source files, one client per file (naturally non-IID, like LEAF's
Shakespeare split by speaker). A small causal transformer, written as a plain
LightningModule, trained through ``fedbat.fit``; FedBAT binarizes its embedding and
attention weights too (``policy.modules=[Linear,Embedding]``).

    python examples/stdlib_text.py compressor=fedbat          # ~1 min on 2 CPU cores
    python examples/stdlib_text.py compressor=none fed.rounds=20

Any fedbat override works (``compressor.downlink=none``, ``trainer.devices=2``, ...); the
run dir is ``runs/stdlib_text/<overrides>``.
"""

from __future__ import annotations

import math
import sys
import sysconfig
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchmetrics.text import Perplexity

import fedbat
from fedbat.config import run_name

CONTEXT = 64  # bytes of context per sample
HELD_OUT = 0.1  # the last 10% of each file is the test text


def stdlib_files(count: int = 40, low: int = 8_000, high: int = 40_000) -> list[Path]:
    """The first ``count`` standard-library modules (by name) of ``low``-``high`` bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.glob("*.py")) if low <= p.stat().st_size <= high]
    return files[:count]


class SourceWindows(Dataset):
    """Windows of ``CONTEXT`` + 1 bytes of each file's train (or test) part, read lazily;
    each sample knows the file (client) it comes from."""

    def __init__(self, files: list[Path], train: bool) -> None:
        self.files, self.train = files, train
        self.index: list[tuple[int, int]] = []  # (file, offset): no text is held
        for f, path in enumerate(files):
            size = path.stat().st_size
            cut = int(size * (1 - HELD_OUT))
            lo, hi = (0, cut) if train else (cut, size)
            self.index += [(f, off) for off in range(lo, hi - CONTEXT - 1, CONTEXT)]
        self._cache: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        f, off = self.index[i]
        if f not in self._cache:
            self._cache[f] = self.files[f].read_bytes()
        chunk = torch.frombuffer(
            bytearray(self._cache[f][off : off + CONTEXT + 1]), dtype=torch.uint8
        )
        ids = chunk.long()
        return {"ids": ids[:-1], "targets": ids[1:], "file": f}


def file_of(sample: dict) -> int:
    return int(sample["file"])


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class ByteNet(nn.Module):
    """A causal transformer over bytes: token and position embeddings, ``depth`` blocks."""

    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, dim)
        self.pos = nn.Embedding(CONTEXT, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.head(self.norm(self.blocks(self.tok(ids) + self.pos(pos))))


class ByteTransformer(L.LightningModule):
    """Next-byte prediction with ``net`` (a 2-block :class:`ByteNet` by default), as a plain
    LightningModule; the optimizer takes the trainable parameters only."""

    def __init__(self, net: nn.Module | None = None, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net if net is not None else ByteNet()
        self.perplexity = Perplexity()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(ids)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["ids"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["ids"])
        self.perplexity.update(logits, batch["targets"])
        self.log("test/ppl", self.perplexity)
        self.log("test/loss", F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(trainable, lr=self.hparams.lr)


DEFAULTS = [
    "fed.rounds=10",
    "fed.clients_per_round=8",
    "fed.local_epochs=1",
    "fed.batch_size=32",
    "policy.modules=[Linear,Embedding]",
]


def main(overrides: list[str], files: int = 40) -> dict:
    torch.manual_seed(0)
    paths = stdlib_files(files)
    name = run_name(overrides)
    run_dir = (  # quoted: the name holds '=' and ',', which Hydra would parse
        [f"run_dir='runs/stdlib_text/{name}'"]
        if not any(o.startswith("run_dir=") for o in overrides)
        else []
    )
    return fedbat.fit(
        ByteTransformer(),
        train_dataset=SourceWindows(paths, train=True),
        test_dataset=SourceWindows(paths, train=False),
        client_key=file_of,
        overrides=[*DEFAULTS, *run_dir, *overrides],
    )


if __name__ == "__main__":
    summary = main(sys.argv[1:])
    print(
        f"test perplexity {summary['final_acc']:.2f} (best {summary['best_acc']:.2f}), "
        f"uplink {summary['bits_uplink_total'] / 8e6:.1f} MB"
    )
    math.isfinite(summary["final_acc"]) or sys.exit(1)
