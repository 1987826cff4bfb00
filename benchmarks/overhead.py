"""fedbat's framework overhead against a minimal plain-PyTorch FedAvg loop, in two regimes.

The same workload both ways: FMNIST, cnn4, iid, 1 local epoch, batch 64, SGD lr 0.1, no
evaluation in the timed rounds, ``compressor=none``.

- ``cross-silo``: 100 clients of 600 samples, 10 a round (local training dominates);
- ``cross-device``: 1,000 clients of 60 samples, 100 a round: the same samples and steps a
  round, but whatever fedbat does per client is paid ten times as often.

Every measurement runs in a fresh process (so its peak RSS is its own), plain and fedbat
interleaved; both end with one test evaluation of the final model (batches of 1,024, as
fedbat evaluates), outside the timed rounds. Prints each regime's median s/round (rounds
after the first), their ratio, the spread of the ratios of each plain/fedbat pair of runs
(targets: cross-silo <= 1.02, cross-device <= 1.03) and both peak RSS (target: fedbat
within 1.1x). Run: python benchmarks/overhead.py
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import _isolate  # noqa: F401
import numpy as np
import torch
import torch.nn.functional as F

REGIMES = {"cross-silo": (100, 10), "cross-device": (1000, 100)}  # clients, per round


def workload(regime: str, rounds: int, threads: int) -> list[str]:
    clients, per_round = REGIMES[regime]
    return [
        "data=fmnist",
        "model=cnn4",
        f"data.num_clients={clients}",
        "data.partition=iid",
        f"fed.clients_per_round={per_round}",
        "fed.local_epochs=1",
        "fed.batch_size=64",
        "fed.lr=0.1",
        f"fed.rounds={rounds}",
        f"fed.eval_every={rounds + 1}",
        f"trainer.threads={threads}",
        "progress=false",
        "resume=false",
    ]


def fedbat_round_seconds(regime: str, rounds: int, threads: int) -> list[float]:
    from omegaconf import open_dict

    from fedbat.compose import compose
    from fedbat.lifecycle import run

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(workload(regime, rounds, threads))
        with open_dict(cfg):
            cfg.run_dir = tmp
        run(cfg)
        with open(f"{tmp}/metrics.csv") as f:
            return [float(r["time/round_s"]) for r in csv.DictReader(f)]


def plain_round_seconds(regime: str, rounds: int, threads: int) -> list[float]:
    """The loop a researcher would write by hand: no compression, no bytes, no logging."""
    from fedbat.datamodules import FederatedDataModule
    from fedbat.models import build

    torch.set_num_threads(threads)
    num_clients, per_round = REGIMES[regime]
    dm = FederatedDataModule("fmnist", num_clients=num_clients, partition="iid", seed=0)
    dm.setup()
    x, y = dm.data.x_train, dm.data.y_train
    torch.manual_seed(0)
    global_model = build("cnn4", (1, 28, 28), 10)
    model = copy.deepcopy(global_model)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        clients = rng.choice(num_clients, per_round, replace=False)
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
    global_model.eval()  # the final test evaluation every fedbat run ends with, untimed
    with torch.no_grad():
        correct = sum(
            int((global_model(xb).argmax(1) == yb).sum()) for xb, yb in dm.test_batches(1024, "cpu")
        )
    print(f"plain test accuracy {correct / len(dm.data.y_test):.4f}", file=sys.stderr)
    return times


def measure(kind: str, regime: str, rounds: int, threads: int) -> dict:
    """One measurement in a fresh process: its round times and its peak RSS."""
    out = subprocess.run(
        [sys.executable, __file__, "--worker", kind, "--regime", regime,
         "--rounds", str(rounds), "--threads", str(threads)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


PHASES = [  # (phase, function, called from): cumulative times under cProfile
    ("local steps (forward, backward, optimizer)", "client.py:_local_epochs", None),
    ("  of which Lightning hooks", "contract.py:call_hook", None),
    ("load the model a client holds", "plan.py:load_model", "client.py:train_client"),
    ("encode the update", "update.py:encode_fields", "client.py:train_client"),
    ("pack the packet", "packet.py:pack", "client.py:train_client"),
    ("client, all of it", "client.py:train_client", None),
    ("server: read the packets (decode, check)", "intake.py:read", None),
    ("server: combine (reading them, float64 sum)", "base.py:combine", None),
    ("server: aggregate, all of it", "server.py:aggregate", None),
    ("server: broadcast", "server.py:broadcast", None),
    ("round, all of it", "federation.py:play_round", None),
]


def profile(threads: int) -> None:
    """Where one cross-device round's time goes, per client, under cProfile (which slows
    Python more than kernels: read the split, not the total)."""
    import cProfile
    import pstats

    import fedbat.federation as federation

    pr, play = cProfile.Profile(), federation.Federation.play_round

    def profiled(self: federation.Federation, r: int) -> dict:
        if r != 1:  # the second round: nothing left to warm up
            return play(self, r)
        pr.enable()
        try:
            return play(self, r)
        finally:
            pr.disable()

    federation.Federation.play_round = profiled  # type: ignore[method-assign]
    fedbat_round_seconds("cross-device", 2, threads)
    stats = pstats.Stats(pr).stats  # type: ignore[attr-defined]

    def cum(where: str, caller: str | None) -> float:
        file, func = where.split(":")
        for (path, _, name), (_, _, _, ct, callers) in stats.items():
            if path.endswith(file) and name == func:
                if caller is None:
                    return ct
                cf, cn = caller.split(":")
                return sum(v[3] for (p, _, n), v in callers.items() if p.endswith(cf) and n == cn)
        return 0.0

    per_round = REGIMES["cross-device"][1]
    print(f"one cross-device round under cProfile, ms per client ({per_round} clients):")
    for phase, where, caller in PHASES:
        print(f"  {phase:<46}{1e3 * cum(where, caller) / per_round:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    parser.add_argument("--regime", choices=[*REGIMES, "both"], default="both")
    parser.add_argument("--worker", choices=["plain", "fedbat"], help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="one cross-device round, by phase")
    args = parser.parse_args()
    if args.profile:
        return profile(args.threads)
    if args.worker:
        fn = plain_round_seconds if args.worker == "plain" else fedbat_round_seconds
        times = fn(args.regime, args.rounds, args.threads)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        print(json.dumps({"times": times, "rss": rss}))
        return
    regimes = list(REGIMES) if args.regime == "both" else [args.regime]
    print(f"torch threads: {args.threads}; medians of rounds 2-{args.rounds} x {args.repeats}")
    targets = {"cross-silo": 1.02, "cross-device": 1.03}
    for regime in regimes:
        got: dict[str, dict[str, list[float]]] = {"plain": {}, "fedbat": {}}
        for _ in range(args.repeats):
            for kind in got:
                m = measure(kind, regime, args.rounds, args.threads)
                got[kind].setdefault("times", []).extend(m["times"][1:])
                got[kind].setdefault("runs", []).append(statistics.median(m["times"][1:]))
                got[kind].setdefault("rss", []).append(m["rss"])
        p, f = (statistics.median(got[k]["times"]) for k in ("plain", "fedbat"))
        rp, rf = (max(got[k]["rss"]) / 2**30 for k in ("plain", "fedbat"))
        clients, per_round = REGIMES[regime]
        print(f"{regime} ({clients} clients, {per_round} a round):")
        print(f"  plain PyTorch : {p:.3f} s/round, peak RSS {rp:.2f} GiB")
        print(f"  fedbat        : {f:.3f} s/round, peak RSS {rf:.2f} GiB")
        print(f"  ratio fedbat/plain: {f / p:.3f} s/round (target <= {targets[regime]}), "
              f"{rf / rp:.2f} RSS (target <= 1.1)")  # fmt: skip
        pairs = [f / p for p, f in zip(got["plain"]["runs"], got["fedbat"]["runs"], strict=True)]
        print(f"  run-to-run: each pair's ratio {min(pairs):.3f} to {max(pairs):.3f}")


if __name__ == "__main__":
    main()
