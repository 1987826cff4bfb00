"""Time to accuracy on the virtual clock: what a compressor and a round policy save in
wall-clock time on slow, uneven devices, not only in bits.

FMNIST cnn4, 100 clients, 10 a round, 1 local epoch; every client gets log-normal links
around 1 Mbit/s up and 10 down (50 ms) and a log-normal compute speed around 5 ms a sample
(``network.spread`` and ``system.compute_spread`` 1.0). FedAvg in fp32 and FedBAT (downlink
fp32 for both), each waiting for all its clients, contacting 13 and keeping the first 10, or
asynchronous (FedBuff: 10 training at once, every 5 arrivals aggregated, twice the rounds
so that as many client updates are aggregated).
Prints, per configuration: final accuracy, the round, virtual time and bits at which the test
accuracy first reached ``--target``, and the median virtual round time.

    python benchmarks/time_to_accuracy.py --rounds 20 --target 0.8
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import _isolate  # noqa: F401
from omegaconf import open_dict

from fedbat.compose import compose
from fedbat.lifecycle import run
from fedbat.plot import read_metrics

DEVICES = [
    "network.uplink_mbps=1", "network.downlink_mbps=10", "network.latency_ms=50",
    "network.spread=1.0", "system.compute_s_per_sample=0.005", "system.compute_spread=1.0",
]  # fmt: skip
CONFIGS = {
    "fedavg, wait for all": ["compressor=none"],
    "fedavg, 13 contacted, first 10": ["compressor=none", "system.over_select=1.3"],
    "fedbat, wait for all": ["compressor=fedbat"],
    "fedbat, 13 contacted, first 10": ["compressor=fedbat", "system.over_select=1.3"],
    "fedavg, fedbuff (10 training, buffer 5)": ["compressor=none", "strategy=fedbuff"],
    "fedbat, fedbuff (10 training, buffer 5)": ["compressor=fedbat", "strategy=fedbuff"],
}
ROUNDS = {"strategy=fedbuff": 2}  # a buffer of 5: twice the rounds for as many client updates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--target", type=float, default=0.8)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/time_to_accuracy"))
    p.add_argument("--only", default="", help="run the configurations whose name has this")
    args = p.parse_args()
    print("| configuration | final acc | round to target | virtual s to target | "
          "uplink bits to target | median virtual s/round | wall s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, overrides in CONFIGS.items():
        if args.only not in name:
            continue
        rounds = args.rounds * max(ROUNDS.get(o, 1) for o in overrides)
        cfg = compose([
            "data=fmnist", "model=cnn4", "fed.local_epochs=1", "data.num_clients=100",
            f"fed.rounds={rounds}", f"target_acc={args.target}", "progress=false",
            "compressor.downlink=none", *DEVICES, *overrides,
            *([f"trainer.threads={args.threads}"] if args.threads else []),
        ])  # fmt: skip
        run_dir = args.out / "".join(ch if ch.isalnum() else "-" for ch in name)
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
        t0 = time.perf_counter()
        summary = run(cfg)
        wall = time.perf_counter() - t0
        rows = read_metrics(run_dir)
        hit = next((r for r in rows if r.get("test/acc", 0.0) >= args.target), None)
        reached = (
            f"{int(hit['round'])} | {hit['sim/clock_s']:.0f} | {hit['bits/uplink_cum']:.3g}"
            if hit
            else "not reached | - | -"
        )
        median = statistics.median(r["sim/round_s"] for r in rows)
        print(f"| {name} | {summary['final_acc']:.4f} | {reached} | {median:.1f} | {wall:.0f} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
