"""fedbat's framework overhead against a minimal plain-PyTorch FedAvg loop.

Same workload in one process: FMNIST, cnn4, 100 clients iid, 10 per round, 1 local epoch,
batch 64, SGD lr 0.1, 3 rounds, no evaluation in the timed rounds. Prints seconds per round
for each and the ratio (target: fedbat / plain <= 1.05). Run: python benchmarks/overhead.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import _isolate  # noqa: F401
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import open_dict

from fedbat.compose import compose
from fedbat.datamodules import FederatedDataModule
from fedbat.lifecycle import run
from fedbat.models import build

WORKLOAD = [
    "data=fmnist",
    "model=cnn4",
    "data.num_clients=100",
    "data.partition=iid",
    "fed.clients_per_round=10",
    "fed.local_epochs=1",
    "fed.batch_size=64",
    "fed.lr=0.1",
    "progress=false",
    "resume=false",
]


def fedbat_round_seconds(rounds: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose([*WORKLOAD, f"fed.rounds={rounds}", f"fed.eval_every={rounds + 1}"])
        with open_dict(cfg):
            cfg.run_dir = tmp
        run(cfg)
        import csv

        with open(f"{tmp}/metrics.csv") as f:
            return [float(r["time/round_s"]) for r in csv.DictReader(f)]


def plain_round_seconds(rounds: int) -> list[float]:
    """The loop a researcher would write by hand: no compression, no bytes, no logging."""
    dm = FederatedDataModule("fmnist", num_clients=100, partition="iid", seed=0)
    dm.setup()
    x, y = dm.data.x_train, dm.data.y_train
    torch.manual_seed(0)
    global_model = build("cnn4", (1, 28, 28), 10)
    model = copy.deepcopy(global_model)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        clients = rng.choice(100, 10, replace=False)
        sizes = [dm.client_size(c) for c in clients]
        total = float(sum(sizes))
        avg = {
            k: torch.zeros_like(v, dtype=torch.float32)
            for k, v in global_model.state_dict().items()
        }
        for c, n in zip(clients, sizes, strict=True):
            model.load_state_dict(global_model.state_dict())
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            idx = dm.client_indices[c]
            for sel in idx[torch.randperm(len(idx))].split(64):
                loss = F.cross_entropy(model(x[sel]), y[sel])
                opt.zero_grad()
                loss.backward()
                opt.step()
            for k, v in model.state_dict().items():
                avg[k] += (n / total) * v.float()
        global_model.load_state_dict(
            {k: v.to(global_model.state_dict()[k].dtype) for k, v in avg.items()}
        )
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each")
    args = parser.parse_args()
    fed, plain = [], []
    for _ in range(args.repeats):
        plain += plain_round_seconds(args.rounds)
        fed += fedbat_round_seconds(args.rounds)
    f, p = statistics.median(fed), statistics.median(plain)
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"plain PyTorch : {p:.3f} s/round (median of {len(plain)})")
    print(f"fedbat        : {f:.3f} s/round (median of {len(fed)})")
    print(f"ratio fedbat/plain: {f / p:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
