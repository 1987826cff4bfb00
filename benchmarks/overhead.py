"""fedbat's framework overhead against a minimal plain-PyTorch FedAvg loop, in two regimes.

The same workload both ways: FMNIST, cnn4, iid, 1 local epoch, batch 64, SGD lr 0.1, no
evaluation in the timed rounds, ``compressor=none``.

- ``cross-silo``: 100 clients of 600 samples, 10 a round (local training dominates);
- ``cross-device``: 1,000 clients of 60 samples, 100 a round: the same samples and steps a
  round, but whatever fedbat does per client is paid ten times as often.

The s/round figures come from both loops in one process, a round of each in turn: whatever
slows the machine or this process's kernels (several percent from one fresh process to the
next here) hits both alike, so each round's pair measures fedbat's own cost. Peak RSS comes
from each loop alone in a fresh process, to the end of a run (a ``fedbat train`` run with
its loggers and checkpoints; both end with one test evaluation, batches of 1,024). Prints
each regime's median s/round (rounds after each process's first), their ratio (targets:
cross-silo <= 1.02, cross-device <= 1.03), the spread of the pairs' ratios and both peak RSS
(target: fedbat within 1.1x). Run: python benchmarks/overhead.py

``--noise`` pairs the plain loop with a second plain loop instead: the ratios a pairing
shows with no difference to measure. ``--fixed-cost`` times a cross-device client besides
its local steps in each loop, and ``--profile`` splits a fedbat round by phase.
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
    """A whole ``fedbat train`` run (loggers, checkpoints, the final evaluation): its rounds'
    ``time/round_s``."""
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


class PlainLoop:
    """The loop a researcher would write by hand: no compression, no bytes, no logging."""

    def __init__(self, regime: str, threads: int, train: bool = True) -> None:
        from fedbat.datamodules import FederatedDataModule
        from fedbat.models import build

        torch.set_num_threads(threads)
        self.num_clients, self.per_round = REGIMES[regime]
        self.dm = FederatedDataModule("fmnist", num_clients=self.num_clients, seed=0)
        self.dm.setup()
        torch.manual_seed(0)
        self.global_model = build("cnn4", (1, 28, 28), 10)
        self.model = copy.deepcopy(self.global_model)
        self.rng = np.random.default_rng(0)
        self.train = train  # False: the round without its local steps (``fixed_cost``)

    def play_round(self) -> float:
        """One round; its seconds."""
        t0 = time.perf_counter()
        x, y, dm = self.dm.data.x_train, self.dm.data.y_train, self.dm
        clients = self.rng.choice(self.num_clients, self.per_round, replace=False)
        sizes = [dm.client_size(c) for c in clients]
        total = float(sum(sizes))
        held = self.global_model.state_dict()
        avg = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in held.items()}
        for c, n in zip(clients, sizes, strict=True):
            self.model.load_state_dict(held)
            self.model.train()
            if self.train:
                opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
                idx = dm.client_indices[c]
                for sel in idx[torch.randperm(len(idx))].split(64):
                    loss = F.cross_entropy(self.model(x[sel]), y[sel])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            for k, v in self.model.state_dict().items():
                avg[k] += (n / total) * v.float()
        self.global_model.load_state_dict({k: v.to(held[k].dtype) for k, v in avg.items()})
        return time.perf_counter() - t0

    def accuracy(self) -> float:
        """The final test evaluation every fedbat run ends with (batches of 1,024)."""
        self.global_model.eval()
        with torch.no_grad():
            correct = sum(
                int((self.global_model(xb).argmax(1) == yb).sum())
                for xb, yb in self.dm.test_batches(1024, "cpu")
            )
        return correct / len(self.dm.data.y_test)


def plain_round_seconds(regime: str, rounds: int, threads: int) -> list[float]:
    loop = PlainLoop(regime, threads)
    times = [loop.play_round() for _ in range(rounds)]
    print(f"plain test accuracy {loop.accuracy():.4f}", file=sys.stderr)
    return times


def paired_round_seconds(
    regime: str, rounds: int, threads: int, same: bool = False
) -> dict[str, list[float]]:
    """Both loops in one process, a round of each in turn (which one goes first alternates):
    the machine's drifts and this process's kernel speed hit both alike, so each pair's
    ratio is fedbat's own cost. fedbat's round is ``Federation.play_round``, the span its
    ``time/round_s`` covers. ``same``: a second plain loop in fedbat's place, whose ratio
    to the first is the measurement's own noise."""
    from omegaconf import open_dict

    from fedbat.assembly import build_components, build_fabric
    from fedbat.compose import compose
    from fedbat.federation import Federation

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(workload(regime, rounds, threads))
        with open_dict(cfg):
            cfg.run_dir = tmp
        fed = Federation(build_components(cfg, build_fabric(cfg)))
        plain = PlainLoop(regime, threads)
        other = PlainLoop(regime, threads) if same else None
        times: dict[str, list[float]] = {"plain": [], "fedbat": []}
        for r in range(rounds):
            for kind in ("plain", "fedbat") if r % 2 == 0 else ("fedbat", "plain"):
                t0 = time.perf_counter()
                if kind == "plain":
                    plain.play_round()
                else:
                    other.play_round() if other else fed.play_round(r)
                times[kind].append(time.perf_counter() - t0)
        return times


def fixed_cost(threads: int, rounds: int = 30) -> None:
    """What a cross-device client costs besides its local steps, in each loop: rounds whose
    clients skip their steps (and so all their optimizer work), a round of each in turn.
    Without the training's noise, a difference of 0.1 ms a client shows."""
    import fedbat.client

    def no_steps(*_args: object) -> tuple[torch.Tensor, dict]:
        return torch.zeros(()), {}

    fedbat.client._local_epochs = no_steps  # type: ignore[assignment]
    from omegaconf import open_dict

    from fedbat.assembly import build_components, build_fabric
    from fedbat.compose import compose
    from fedbat.federation import Federation

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(workload("cross-device", rounds, threads))
        with open_dict(cfg):
            cfg.run_dir = tmp
        fed = Federation(build_components(cfg, build_fabric(cfg)))
        plain = PlainLoop("cross-device", threads, train=False)
        times: dict[str, list[float]] = {"plain": [], "fedbat": []}
        for r in range(rounds):
            t0 = time.perf_counter()
            fed.play_round(r)
            times["fedbat"].append(time.perf_counter() - t0)
            times["plain"].append(plain.play_round())
    per_round = REGIMES["cross-device"][1]
    ms = {k: 1e3 * statistics.median(v[2:]) / per_round for k, v in times.items()}
    print(f"a cross-device client besides its local steps, median of rounds 3-{rounds}:")
    print(f"  plain PyTorch {ms['plain']:.2f} ms, fedbat {ms['fedbat']:.2f} ms: "
          f"fedbat adds {ms['fedbat'] - ms['plain']:.2f} ms a client")  # fmt: skip


WORKERS = {"plain": plain_round_seconds, "fedbat": fedbat_round_seconds}
PAIRED = ("paired", "paired-same")  # plain against fedbat; against a second plain loop


def measure(kind: str, regime: str, rounds: int, threads: int) -> dict:
    """One worker in a fresh process: its round times and its peak RSS."""
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
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each loop a process")
    parser.add_argument("--repeats", type=int, default=2, help="processes timing both loops")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    parser.add_argument("--regime", choices=[*REGIMES, "both"], default="both")
    parser.add_argument("--worker", choices=[*WORKERS, *PAIRED], help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="one cross-device round, by phase")
    parser.add_argument(
        "--fixed-cost", action="store_true", help="a cross-device client's cost besides its steps"
    )
    parser.add_argument(
        "--noise", action="store_true", help="the same pairing, plain loop against plain loop"
    )
    args = parser.parse_args()
    if args.profile:
        return profile(args.threads)
    if args.fixed_cost:
        return fixed_cost(args.threads)
    if args.worker:
        if args.worker in PAIRED:
            same = args.worker == "paired-same"
            times = paired_round_seconds(args.regime, args.rounds, args.threads, same)
        else:
            times = WORKERS[args.worker](args.regime, args.rounds, args.threads)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        print(json.dumps({"times": times, "rss": rss}))
        return
    regimes = list(REGIMES) if args.regime == "both" else [args.regime]
    print(
        f"torch threads: {args.threads}; {args.repeats} processes x rounds 2-{args.rounds} "
        "of each loop, in turn"
    )
    targets = {"cross-silo": 1.02, "cross-device": 1.03}
    for regime in regimes:
        got: dict[str, list[float]] = {"plain": [], "fedbat": []}
        for _ in range(args.repeats):
            worker = "paired-same" if args.noise else "paired"
            times = measure(worker, regime, args.rounds, args.threads)["times"]
            for kind in got:
                got[kind] += times[kind][1:]  # each process's first round warms up
        pairs = sorted(b / a for a, b in zip(got["plain"], got["fedbat"], strict=True))
        if args.noise:
            p, f = (statistics.median(got[k]) for k in ("plain", "fedbat"))
            print(f"{regime}, plain loop against plain loop: ratio {f / p:.3f}; each round's "
                  f"pair: median {statistics.median(pairs):.3f}, {pairs[0]:.3f} to "
                  f"{pairs[-1]:.3f} over {len(pairs)} pairs")  # fmt: skip
            continue
        # peak RSS: each loop alone in a fresh process, to its final evaluation
        rss = {k: measure(k, regime, 3, args.threads)["rss"] / 2**30 for k in WORKERS}
        p, f = (statistics.median(got[k]) for k in ("plain", "fedbat"))
        clients, per_round = REGIMES[regime]
        print(f"{regime} ({clients} clients, {per_round} a round):")
        print(f"  plain PyTorch : {p:.3f} s/round, peak RSS {rss['plain']:.2f} GiB")
        print(f"  fedbat        : {f:.3f} s/round, peak RSS {rss['fedbat']:.2f} GiB")
        print(f"  ratio fedbat/plain: {f / p:.3f} s/round (target <= {targets[regime]}), "
              f"{rss['fedbat'] / rss['plain']:.2f} RSS (target <= 1.1)")  # fmt: skip
        print(
            f"  each round's pair: median {statistics.median(pairs):.3f}, "
            f"{pairs[0]:.3f} to {pairs[-1]:.3f} over {len(pairs)} pairs"
        )


if __name__ == "__main__":
    main()
