"""Test accuracy of the cross-device job under each BatchNorm statistics rule.

FMNIST, cnn4, FedAvg, ``compressor=none``, 1,000 iid clients of 60 samples, 100 a round,
1 local epoch (one step a client), batch 64, lr 0.1: the regime where averaged running
statistics trail the weights (``fedbat/batchnorm.py``). Prints, per ``fed.bn_stats``, the
test accuracy and train loss after ``--rounds`` rounds and the uplink bits per round.
Run: python benchmarks/bn_stats.py
"""

from __future__ import annotations

import argparse
import csv
import tempfile

import _isolate  # noqa: F401
from omegaconf import open_dict

from fedbat.batchnorm import RULES
from fedbat.compose import compose
from fedbat.lifecycle import run


def job(rule: str, rounds: int, threads: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose([
            "data=fmnist", "model=cnn4", "data.num_clients=1000", "data.partition=iid",
            "fed.clients_per_round=100", "fed.local_epochs=1", "fed.batch_size=64",
            "fed.lr=0.1", f"fed.rounds={rounds}", f"fed.eval_every={rounds}",
            f"fed.bn_stats={rule}", f"trainer.threads={threads}", "progress=false",
            "resume=false",
        ])  # fmt: skip
        with open_dict(cfg):
            cfg.run_dir = tmp
        run(cfg)
        with open(f"{tmp}/metrics.csv") as f:
            last = list(csv.DictReader(f))[-1]
    return {k: float(last[k]) for k in ("test/acc", "train/loss", "bits/uplink")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(f"{'fed.bn_stats':<14}{'test acc':>10}{'train loss':>12}{'uplink bits/round':>20}")
    for rule in RULES:
        m = job(rule, args.rounds, args.threads)
        print(f"{rule:<14}{m['test/acc']:>10.4f}{m['train/loss']:>12.4f}"
              f"{m['bits/uplink']:>20,.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
