"""A Flower deployment's round against a ``fedbat train`` round of the same job.

Runs the job three ways, one after another on this machine: ``fedbat train``, ``fedbat
flower`` with warm ClientApps (forks of a server that imported the stack once: the
default) and with cold ones (``--cold-clients``: a fresh process per message, as Flower
starts them), and prints each one's median ``time/round_s`` over the rounds after the
first (the first also waits for the nodes to join) and the ratios to ``fedbat train``::

    python benchmarks/flower_round.py                       # FMNIST, cnn4, 2 of 3 clients
    python benchmarks/flower_round.py --job data=digits fed.rounds=4   # a quick look

A deployment's clients of a round train in parallel (separate processes, as separate
devices do); ``fedbat train``'s one after another in one process. With
``trainer.threads=1`` (the default job here) each client has one core in both, so a
deployment uses two cores where ``fedbat train`` uses one; the ``trainer.threads=2`` row
gives ``fedbat train`` both.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOB = ["data=fmnist", "model=cnn4", "fed.clients_per_round=2", "fed.local_epochs=1",
       "compressor=fedbat", "fed.rounds=3", "trainer.threads=1"]  # fmt: skip
SUPERNODES = 3


def seconds_per_round(run_dir: Path) -> float:
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return statistics.median(float(r["time/round_s"]) for r in rows[1:])


def timed(cmd: list[str], run_dir: Path) -> float:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    out = subprocess.run([*cmd, f"run_dir={run_dir}"], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {out.stderr[-2000:]}")
    print(f"  {' '.join(cmd[:4])}: {time.perf_counter() - start:.1f} s in all", flush=True)
    return seconds_per_round(run_dir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", nargs="*", default=JOB, help="fedbat train overrides")
    p.add_argument("--supernodes", type=int, default=SUPERNODES)
    args = p.parse_args()
    n = args.supernodes
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        job = [*args.job, f"data.num_clients={n}"]
        train = timed(["fedbat", "train", *job], base / "train")
        both = timed(["fedbat", "train", *job, "trainer.threads=2"], base / "both")
        flower = ["fedbat", "flower", "--supernodes", str(n)]
        warm = timed([*flower, *args.job], base / "warm")
        cold = timed([*flower[:2], "--cold-clients", *flower[2:], *args.job], base / "cold")
    print(f"job: {' '.join(args.job)}, {n} SuperNodes")
    print(f"{'run':<34} {'s/round':>8} {'ratio':>6}")
    rows = (("fedbat train", train), ("fedbat train trainer.threads=2", both),
            ("fedbat flower (warm)", warm), ("fedbat flower --cold-clients", cold))  # fmt: skip
    for name, s in rows:
        print(f"{name:<34} {s:8.2f} {s / train:6.2f}")


if __name__ == "__main__":
    main()
