"""FedBAT's local-training cost against FedAvg's, and where FedBAT's extra time goes.

Workload: FMNIST, cnn4, 100 clients iid, 10 per round, E=2 local epochs, batch 64, lr 0.1,
one process (no evaluation in the timed rounds). Prints the median local-training s/round of
``compressor=none`` and ``compressor=fedbat`` (uplink; downlink none) measured in this run,
their ratio (target: <= 1.10), and a torch profile of one FedBAT client's training: the
operators that take the most CPU time. Run: python benchmarks/fedbat_cost.py
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile

import _isolate  # noqa: F401
import torch
from omegaconf import open_dict

from fedbat.assembly import build_components, build_fabric
from fedbat.client import ClientJob, train_client
from fedbat.compose import compose
from fedbat.lifecycle import run

WORKLOAD = [
    "data=fmnist",
    "model=cnn4",
    "data.num_clients=100",
    "data.partition=iid",
    "fed.clients_per_round=10",
    "fed.local_epochs=2",
    "fed.batch_size=64",
    "fed.lr=0.1",
    "compressor.downlink=none",
    "progress=false",
    "resume=false",
]


def round_seconds(compressor: str, rounds: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        args = [*WORKLOAD, f"compressor={compressor}", f"fed.rounds={rounds}"]
        cfg = compose([*args, f"fed.eval_every={rounds + 1}"])
        with open_dict(cfg):
            cfg.run_dir = tmp
        run(cfg)
        with open(f"{tmp}/metrics.csv") as f:
            return [float(r["time/train_s"]) for r in csv.DictReader(f)]


def profile_one_client(rows: int) -> str:
    cfg = compose([*WORKLOAD, "compressor=fedbat"])
    parts = build_components(cfg, build_fabric(cfg))
    held = {k: v.clone() for k, v in parts.task.state_dict().items()}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_client(parts.setup, ClientJob(client=0, round=0, held=held))
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile-rows", type=int, default=15)
    args = p.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    times: dict[str, list[float]] = {"none": [], "fedbat": []}
    for _ in range(args.repeats):  # interleaved, so drifts of the machine hit both alike
        for c in times:
            times[c] += round_seconds(c, args.rounds)[1:]  # each run's round 1 warms up
    med = {c: statistics.median(t) for c, t in times.items()}
    print(f"fedavg (none) {med['none']:.3f} s/round, fedbat {med['fedbat']:.3f} s/round")
    print(f"ratio fedbat / fedavg: {med['fedbat'] / med['none']:.3f} (target <= 1.10)")
    print(profile_one_client(args.profile_rows))


if __name__ == "__main__":
    main()
