"""Seconds per round with 1 process x 2 threads against 2 processes x 1 thread (and 1 GPU
where one is present), same FedAvg workload: FMNIST, cnn4, 100 clients, 10 per round,
1 local epoch, batch 64. Also the share of round time spent outside local training
(exchange, decode, aggregation, broadcast). Run: python benchmarks/scaling.py
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

WORKLOAD = [
    "data=fmnist",
    "model=cnn4",
    "data.num_clients=100",
    "fed.clients_per_round=10",
    "fed.local_epochs=1",
    "fed.batch_size=64",
    "progress=false",
    "resume=false",
]


def seconds_per_round(rounds: int, *trainer: str) -> tuple[float, float]:
    """(median s/round, median share of the round not spent in local training)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "fedbat.cli",
            "train",
            *WORKLOAD,
            f"fed.rounds={rounds}",
            f"fed.eval_every={rounds}",
            f"hydra.run.dir={tmp}",
            *trainer,
        ]
        subprocess.run(cmd, check=True, capture_output=True)
        with open(Path(tmp) / "metrics.csv") as f:
            rows = list(csv.DictReader(f))[1:]  # the first round warms up
    per_round = statistics.median(float(r["time/round_s"]) for r in rows)
    outside = statistics.median(float(r["time/server_s"]) / float(r["time/round_s"]) for r in rows)
    return per_round, outside


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    configs = {
        "1 process x 2 threads": ["trainer.devices=1", "trainer.threads=2"],
        "2 processes x 1 thread": ["trainer.devices=2", "trainer.threads=1"],
        "1 process x 1 thread (reference)": ["trainer.devices=1", "trainer.threads=1"],
    }
    if torch.cuda.is_available():
        configs[f"1 GPU ({torch.cuda.get_device_name(0)})"] = ["trainer.accelerator=gpu"]
    results = {}
    for name, trainer in configs.items():
        results[name] = seconds_per_round(args.rounds, *trainer)
        s, share = results[name]
        print(f"{name:40} {s:7.3f} s/round   exchange+aggregation {100 * share:4.1f}% of round")
    one, two = (results[k][0] for k in list(configs)[:2])
    print(f"speed-up 2 processes vs 1: {one / two:.2f}x (target >= 1.3x)")


if __name__ == "__main__":
    main()
