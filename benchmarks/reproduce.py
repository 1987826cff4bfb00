"""Reduced reproduction of the FedBAT paper's FMNIST table on this machine.

FMNIST, cnn4, 100 clients, 10 per round, batch 64, lr 0.1, iid and Dirichlet 0.3, a reduced
budget (default 20 rounds x 2 local epochs): every compressor on the uplink with the
downlink uncompressed, then fedbat on both directions. Writes a markdown table and
accuracy-vs-round / accuracy-vs-uplink-bits plots into ``--out`` (the table as
``table.md``; docs/results.md is curated by hand from such tables). Runs resume from their
checkpoints, so an interrupted reproduction continues where it stopped.

    python benchmarks/reproduce.py --out benchmarks/out/reproduce
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import _isolate  # noqa: F401
from omegaconf import open_dict

from fedbat.compose import compose
from fedbat.lifecycle import run
from fedbat.plot import plot_runs, read_metrics

UPLINK_ONLY = ["none", "fedbat", "topk", "qsgd", "signsgd", "ef_signsgd"]


PARTITIONS = {
    "iid": ["data.partition=iid"],
    "dirichlet 0.3": ["data.partition=dirichlet", "data.alpha=0.3"],
}


def runs(
    rounds: int,
    epochs: int,
    compressors: list[str],
    partitions: list[str],
    both: bool,
    seed: int = 0,
) -> list[tuple[str, str, list[str]]]:
    """(partition label, run name, overrides) for every run of the table."""
    out = []
    for part in partitions:
        base = [
            "data=fmnist",
            "model=cnn4",
            "data.num_clients=100",
            "fed.clients_per_round=10",
            "fed.batch_size=64",
            "fed.lr=0.1",
            f"fed.rounds={rounds}",
            f"fed.local_epochs={epochs}",
            f"seed={seed}",
            "progress=false",
            *PARTITIONS[part],
        ]
        for c in compressors:
            down = [f"compressor={c}", "compressor.downlink=none"]
            out.append((part, f"{c} / none", [*base, *down]))
        if both:
            out.append((part, "fedbat / fedbat", [*base, "compressor=fedbat"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/reproduce"))
    p.add_argument("--table", type=Path, help="markdown table path (default: OUT/table.md)")
    p.add_argument("--compressors", default=",".join(UPLINK_ONLY), help="uplink compressors")
    p.add_argument("--partitions", default="iid,dirichlet 0.3", help=f"of {list(PARTITIONS)}")
    p.add_argument("--no-both", action="store_true", help="skip fedbat on both directions")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling, data order, draws")
    args = p.parse_args()
    plan = runs(
        args.rounds,
        args.epochs,
        args.compressors.split(","),
        args.partitions.split(","),
        not args.no_both,
        args.seed,
    )
    header = "| partition | uplink / downlink | final acc | best acc | mean acc | uplink bits |"
    lines = [header + " downlink bits | s/round |", "|---|---|---|---|---|---|---|---|"]
    by_part: dict[str, list[Path]] = {}
    for part, name, overrides in plan:
        run_dir = args.out / part.split()[0] / name.replace(" / ", "__")
        cfg = compose(overrides)
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
        summary = run(cfg)
        rows = read_metrics(run_dir)
        secs = statistics.median(r["time/round_s"] for r in rows)
        mean_acc = statistics.mean(r["test/acc"] for r in rows)  # area under acc vs round
        lines.append(
            f"| {part} | {name} | {summary['final_acc']:.4f} | {summary['best_acc']:.4f} | "
            f"{mean_acc:.4f} | "
            f"{summary['bits_uplink_total']:.3e} | {summary['bits_downlink_total']:.3e} | "
            f"{secs:.2f} |"
        )
        by_part.setdefault(part.split()[0], []).append(run_dir)
        print(lines[-1], flush=True)
    for part, dirs in by_part.items():
        plot_runs(dirs, args.out / part)
    table = args.table or args.out / "table.md"
    table.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "benchmarks/reproduce.py", *sys.argv[1:]])
    intro = (
        f"FMNIST, cnn4, 100 clients, 10 per round, batch 64, lr 0.1, {args.rounds} rounds x "
        f"{args.epochs} local epochs. Measured with:\n\n    {command}\n\n"
    )
    table.write_text(intro + "\n".join(lines) + "\n")
    print(f"table: {table}; plots: {args.out}/*/acc_vs_*.png")


if __name__ == "__main__":
    main()
