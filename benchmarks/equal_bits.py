"""Every compressor at equal uplink bits: the FedBAT paper's FMNIST protocol
(``experiment=fmnist_paper``: cnn4, 100 clients, 10 a round, 10 local epochs, batch 64, lr
0.1, downlink fp32), iid and Dirichlet 0.3, two seeds, each compressor set to cost about 1, 2
or 4 bits per coordinate on the uplink.

A finished run's config.yaml, metrics.csv and summary.json are copied into ``--record``
(committed, docs/data/equal_bits), and a run already recorded there is not run again; an
unfinished one resumes from its checkpoint in ``--out``. So the grid, hours on two cores,
fills over several sittings, and ``--render`` rewrites the tables and plots in
docs/results.md from what is recorded, saying which runs are still missing.

    python benchmarks/equal_bits.py --only 1bit --seeds 0   # run part of the grid
    python benchmarks/equal_bits.py --render                # tables + plots from the record
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import _isolate  # noqa: F401
from omegaconf import open_dict

from fedbat.compose import compose
from fedbat.lifecycle import run
from fedbat.plot import plot_runs, read_metrics
from fedbat.rundir import CONFIG, METRICS, SUMMARY

# (budget, run name, compressor overrides); parameters chosen from the cnn4 packet sizes that
# `fedbat list` and benchmarks/compressors.py print (1.16 bits/coord for the 1-bit methods)
GRID: list[tuple[str, str, list[str]]] = [
    ("32bit", "none", ["compressor=none"]),
    ("1bit", "fedbat", ["compressor=fedbat"]),
    ("1bit", "signsgd", ["compressor=signsgd"]),
    ("1bit", "ef_signsgd", ["compressor=ef_signsgd"]),
    ("1bit", "drive", ["compressor=drive"]),
    ("1bit", "eden-1", ["compressor=eden", "compressor.bits=1.0"]),
    ("1bit", "randk-1_32", ["compressor=randk", "compressor.ratio=0.03125"]),
    ("1bit", "topk-0.0155", ["compressor=topk", "compressor.ratio=0.0155"]),
    ("1bit", "powersgd-5", ["compressor=powersgd", "compressor.rank=5"]),
    ("2bit", "terngrad", ["compressor=terngrad"]),
    ("2bit", "eden-2", ["compressor=eden", "compressor.bits=2.0"]),
    ("2bit", "qsgd-s1", ["compressor=qsgd", "compressor.levels=1"]),
    ("2bit", "powersgd-9", ["compressor=powersgd", "compressor.rank=9"]),
    ("4bit", "eden-4", ["compressor=eden", "compressor.bits=4.0"]),
    ("4bit", "qsgd-s7", ["compressor=qsgd", "compressor.levels=7"]),
    ("4bit", "nf4", ["compressor=nf4"]),
]
PARTITIONS = {
    "iid": ["data.partition=iid"],
    "dirichlet": ["data.partition=dirichlet", "data.alpha=0.3"],
}
RECORDED = (CONFIG, METRICS, SUMMARY)
BEGIN, END = "<!-- equal-bits:begin -->", "<!-- equal-bits:end -->"


def overrides(name: str, part: str, seed: int, rounds: int, threads: int | None) -> list[str]:
    comp = next(c for _, n, c in GRID if n == name)
    return [
        *([f"trainer.threads={threads}"] if threads else []),
        "experiment=fmnist_paper",
        f"fed.rounds={rounds}",
        f"seed={seed}",
        "progress=false",
        *PARTITIONS[part],
        *comp,
        "compressor.downlink=none",
    ]


def train(args: argparse.Namespace) -> None:
    budgets = args.only.split(",") if args.only else None
    for seed in map(int, args.seeds.split(",")):
        for part in args.partitions.split(","):
            for budget, name, _ in GRID:
                if budgets and budget not in budgets and name not in budgets:
                    continue
                record = args.record / part / name / f"seed{seed}"
                if (record / SUMMARY).is_file():
                    continue
                run_dir = args.out / part / name / f"seed{seed}"
                cfg = compose(overrides(name, part, seed, args.rounds, args.threads))
                with open_dict(cfg):
                    cfg.run_dir = str(run_dir)
                t0 = time.perf_counter()
                summary = run(cfg)
                record.mkdir(parents=True, exist_ok=True)
                for f in RECORDED:
                    shutil.copyfile(run_dir / f, record / f)
                print(
                    f"{part} {name} seed {seed}: final {summary['final_acc']:.4f} in "
                    f"{time.perf_counter() - t0:.0f} s",
                    flush=True,
                )


def row(budget: str, name: str, dirs: list[Path], coords: int) -> str:
    """One table row: accuracies as the mean over the recorded seeds (each seed's value after
    it in brackets), uplink bits per coordinate and in total."""
    sums = [json.loads((d / SUMMARY).read_text()) for d in dirs]
    metrics = [read_metrics(d) for d in dirs]

    def cell(values: list[float]) -> str:
        each = "/".join(f"{v:.3f}" for v in values)
        return f"{statistics.mean(values):.4f} ({each})"

    final = [s["final_acc"] for s in sums]
    best = [s["best_acc"] for s in sums]
    mean = [statistics.mean(r["test/acc"] for r in m if "test/acc" in r) for m in metrics]
    bits = sums[0]["bits_uplink_total"]
    rounds, clients = len(metrics[0]), 10
    secs = statistics.median(r["time/round_s"] for m in metrics for r in m)
    per_coord = bits / (rounds * clients * coords)
    return (
        f"| {budget} | {name} | {per_coord:.2f} | {cell(final)} | {cell(best)} | {cell(mean)} | "
        f"{bits:.3e} | {secs:.0f} |"
    )


SEEDS = (0, 1)  # the grid's: a render shows them all, whichever --seeds trained


def render(args: argparse.Namespace) -> None:
    from fedbat.models import build

    coords = sum(p.numel() for p in build("cnn4", (1, 28, 28), 10).state_dict().values())
    out = []
    for part in PARTITIONS:  # all of them, every seed: the block is rewritten whole
        out += [
            f"### {part}{' 0.3' if part == 'dirichlet' else ''}",
            "",
            "| budget | uplink compressor | bits/coord | final acc | best acc | mean acc | "
            "uplink bits | s/round |",
            "|---|---|---|---|---|---|---|---|",
        ]
        missing, dirs_all = [], []
        for budget, name, _ in GRID:
            dirs = [args.record / part / name / f"seed{s}" for s in SEEDS]
            done = [d for d in dirs if (d / SUMMARY).is_file()]
            missing += [f"{name} seed {d.name[4:]}" for d in dirs if d not in done]
            if done:
                out.append(row(budget, name, done, coords))
                dirs_all += done
        if missing:
            out += ["", f"Not yet run: {', '.join(missing)}."]
        if dirs_all:
            img = args.results.parent / "img" / f"equal_bits_{part}"
            names = {d: d.parent.name for d in dirs_all}  # records of several fedbat versions
            plot_runs(dirs_all, img, ("uplink",), title_text=f"FMNIST cnn4, {part}", labels=names)
            out += ["", f"![{part}](img/equal_bits_{part}/acc_vs_uplink_bits.png)"]
        out.append("")
    text = args.results.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    args.results.write_text(f"{head}{BEGIN}\n" + "\n".join(out) + f"{END}{tail}")
    print(f"rendered {args.results}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="to train")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    p.add_argument("--partitions", default=",".join(PARTITIONS), help=f"of {list(PARTITIONS)}")
    p.add_argument(
        "--only", help="budgets (1bit, 2bit, ...) or run names to train, comma-separated"
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/equal_bits"))
    p.add_argument("--record", type=Path, default=Path("docs/data/equal_bits"))
    p.add_argument("--results", type=Path, default=Path("docs/results.md"))
    p.add_argument("--render", action="store_true", help="only rewrite the tables and plots")
    args = p.parse_args()
    if not args.render:
        train(args)
    render(args)


if __name__ == "__main__":
    main()
