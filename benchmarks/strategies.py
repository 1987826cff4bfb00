"""Every strategy with ``compressor=none`` and ``compressor=fedbat`` (uplink; downlink fp32)
on FMNIST, cnn4, 100 clients Dirichlet(0.3), 10 per round, batch 64, lr 0.1, at a budget
that fits a 2-core CPU (default 10 rounds x 1 local epoch). Prints a markdown table of final
and mean-over-rounds test accuracy and the bits sent each way. Runs resume from their
checkpoints in ``--out``.

    python benchmarks/strategies.py --out benchmarks/out/strategies
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import _isolate  # noqa: F401
from omegaconf import open_dict

from fedbat.compose import compose
from fedbat.lifecycle import run
from fedbat.plot import read_metrics
from fedbat.strategies import STRATEGIES

ADAPTIVE_LR = {"fedadam": 0.01, "fedyogi": 0.01, "fedadagrad": 0.01}  # Reddi et al.'s range


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--strategies", default=",".join(sorted(STRATEGIES)))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/strategies"))
    args = parser.parse_args()
    base = [
        "data=fmnist",
        "model=cnn4",
        "data.num_clients=100",
        "data.partition=dirichlet",
        "data.alpha=0.3",
        "fed.clients_per_round=10",
        "fed.batch_size=64",
        "fed.lr=0.1",
        f"fed.rounds={args.rounds}",
        f"fed.local_epochs={args.epochs}",
        "compressor.downlink=none",
        "progress=false",
    ]
    rows = ["| strategy | compressor | final acc | mean acc | uplink bits | downlink bits |"]
    rows.append("|---|---|---|---|---|---|")
    for name in args.strategies.split(","):
        lr = [f"strategy.lr={ADAPTIVE_LR[name]}"] if name in ADAPTIVE_LR else []
        for compressor in ("none", "fedbat"):
            cfg = compose([*base, f"strategy={name}", *lr, f"compressor={compressor}"])
            with open_dict(cfg):
                cfg.run_dir = str(args.out / f"{name}_{compressor}")
            summary = run(cfg)
            accs = [float(r["test/acc"]) for r in read_metrics(Path(cfg.run_dir))]
            rows.append(
                f"| {name} | {compressor} | {summary['final_acc']:.4f} | "
                f"{statistics.mean(accs):.4f} | {summary['bits_uplink_total']:.3g} | "
                f"{summary['bits_downlink_total']:.3g} |"
            )
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
