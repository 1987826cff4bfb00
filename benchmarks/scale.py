"""Cross-device populations: s/round and peak RSS as the number of clients grows, with
error feedback (every sampled client keeps a full-size fp32 residual) on FMNIST cnn4.

Each configuration runs in a fresh process; its peak RSS is the process's maximum resident
set. Per-client state lives in the client store on disk (``run_dir/clients/``), so peak
RSS should not grow with the clients that hold state; the table also shows how many hold
some and what they occupy on disk (what every process used to keep in memory).

Run: python benchmarks/scale.py --clients 100,1000,10000 --per-round 100 --rounds 30
(``--rounds 0``: until every client has been sampled at least once.)
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import _isolate  # noqa: F401  (before any fedbat import)

from fedbat.seeding import sample_clients

RUN = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def rounds_to_cover(num_clients: int, per_round: int, seed: int = 0) -> int:
    """The rounds until every client has been sampled at least once."""
    seen: set[int] = set()
    r = 0
    while len(seen) < num_clients:
        seen.update(sample_clients(seed, r, num_clients, per_round))
        r += 1
    return r


def measure(num_clients: int, per_round: int, rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "fedbat.cli", "train", "data=fmnist", "model=cnn4"]
        cmd += ["compressor=ef_signsgd", "compressor.downlink=none", "progress=false"]
        cmd += [f"data.num_clients={num_clients}", f"fed.clients_per_round={per_round}"]
        cmd += [f"fed.rounds={rounds}", f"fed.eval_every={rounds}", f"run_dir={run_dir}"]
        out = subprocess.run(
            [sys.executable, "-c", RUN, *cmd], capture_output=True, text=True, check=True
        )
        peak_kb = int(out.stdout.strip().splitlines()[-1])
        with open(run_dir / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        files = list((run_dir / "clients").glob("*.safetensors"))
        summary = json.loads((run_dir / "summary.json").read_text())
        return {
            "s/round": statistics.median(float(r["time/round_s"]) for r in rows[1:] or rows),
            "peak RSS MB": peak_kb / 1024,
            "clients with state": len(files),
            "state on disk MB": sum(p.stat().st_size for p in files) / 2**20,
            "test/acc": summary["final_acc"],
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="100,1000,10000")
    p.add_argument("--per-round", default="100", help="one value, or one per --clients")
    p.add_argument("--rounds", type=int, default=30, help="0: until all clients are sampled")
    args = p.parse_args()
    populations = [int(c) for c in args.clients.split(",")]
    per_round = [int(k) for k in args.per_round.split(",")]
    per_round = per_round * len(populations) if len(per_round) == 1 else per_round
    print("| clients | per round | rounds | s/round | peak RSS MB | clients with state "
          "| state on disk MB | test/acc |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for n, k in zip(populations, per_round, strict=True):
        rounds = args.rounds or rounds_to_cover(n, k)
        m = measure(n, k, rounds)
        print(
            f"| {n} | {k} | {rounds} | {m['s/round']:.2f} | {m['peak RSS MB']:.0f} "
            f"| {m['clients with state']} | {m['state on disk MB']:.0f} | {m['test/acc']:.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
