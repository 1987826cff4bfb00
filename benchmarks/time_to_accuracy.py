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
import json
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

# --scenario mobile: Dirichlet 0.3 clients on phone-like devices that come and go
MOBILE = [
    "data.partition=dirichlet", "data.alpha=0.3",
    "network.uplink_mbps=1", "network.downlink_mbps=10", "network.latency_ms=50",
    "network.spread=1.0", "system.compute_s_per_sample=0.0136", "system.compute_spread=0.6",
]  # fmt: skip
DEADLINE_S = 30
UPLINKS = {
    "fp32": ["compressor=none"],
    "fedbat": ["compressor=fedbat"],
    "eden b=1": ["compressor=eden", "compressor.bits=1"],
    "qsgd s=1": ["compressor=qsgd", "compressor.levels=1"],
    "topk 1.55%": ["compressor=topk", "compressor.ratio=0.0155"],
}
POLICIES = {
    f"deadline {DEADLINE_S} s": [f"system.deadline_s={DEADLINE_S}"],
    "fedbuff": ["strategy=fedbuff"],
}
MOBILE_CONFIGS = {
    f"{up}, {policy}": [*u, *p] for policy, p in POLICIES.items() for up, u in UPLINKS.items()
}


def availability(path: Path, clients: int, seed: int = 0, horizon_s: float = 2e5) -> Path:
    """Intermittent devices: each client alternates online and offline spells, exponential
    with means of 10 and 5 minutes, from a random phase (written once, seeded)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = ["client,start_s,end_s"]
    for c in range(clients):
        t = -rng.exponential(600.0) if rng.random() < 2 / 3 else rng.exponential(300.0)
        while t < horizon_s:
            end = t + rng.exponential(600.0)
            if end > 0:
                rows.append(f"{c},{max(t, 0.0):.3f},{end:.3f}")
            t = end + rng.exponential(300.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--target", type=float, default=0.8)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/time_to_accuracy"))
    p.add_argument("--only", default="", help="run the configurations whose name has this")
    p.add_argument("--scenario", choices=["uniform", "mobile"], default="uniform")
    p.add_argument("--plot", type=Path, help="draw accuracy against virtual time here")
    args = p.parse_args()
    curves: dict[str, list[dict]] = {}
    split_inputs: dict[str, tuple] = {}
    configs, devices = CONFIGS, DEVICES
    if args.scenario == "mobile":
        args.out = args.out.with_name(args.out.name + "_mobile")
        online = availability(args.out / "availability.csv", 100)
        configs, devices = MOBILE_CONFIGS, [*MOBILE, f"system.availability={online}"]
    print("| configuration | final acc | round to target | virtual s to target | uplink bits "
          "to target | median virtual s/round | lost clients/round | wall s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, overrides in configs.items():
        if args.only not in name:
            continue
        rounds = args.rounds * max(ROUNDS.get(o, 1) for o in overrides)
        cfg = compose([
            "data=fmnist", "model=cnn4", "fed.local_epochs=1", "data.num_clients=100",
            f"fed.rounds={rounds}", f"target_acc={args.target}", "progress=false",
            "compressor.downlink=none", *devices, *overrides,
            *([f"trainer.threads={args.threads}"] if args.threads else []),
        ])  # fmt: skip
        run_dir = args.out / "".join(ch if ch.isalnum() else "-" for ch in name)
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
        t0, done = time.perf_counter(), run_dir / "summary.json"
        if done.exists():  # recorded: read, not run again
            summary, wall = json.loads(done.read_text()), "-"
        else:
            summary = run(cfg)
            wall = f"{time.perf_counter() - t0:.0f}"
        rows = read_metrics(run_dir)
        curves[name], split_inputs[name] = rows, (cfg, rows)
        hit = next((r for r in rows if r.get("test/acc", 0.0) >= args.target), None)
        reached = (
            f"{int(hit['round'])} | {hit['sim/clock_s']:.0f} | {hit['bits/uplink_cum']:.3g}"
            if hit
            else "not reached | - | -"
        )
        median = statistics.median(r["sim/round_s"] for r in rows)
        lost = statistics.mean(r.get("clients/dropped", 0) + r.get("clients/late", 0) for r in rows)
        print(f"| {name} | {summary['final_acc']:.4f} | {reached} | {median:.1f} | {lost:.1f} "
              f"| {wall} |", flush=True)  # fmt: skip
    print("\n| configuration | median download s | median compute s | median upload s |")
    print("|---|---|---|---|")
    for name, (cfg, rows) in split_inputs.items():
        d, c, u = phases(cfg, rows)
        print(f"| {name} | {d:.2f} | {c:.2f} | {u:.2f} |")
    if args.plot:
        plot(curves, args.target, args.plot)


def phases(cfg, rows: list[dict]) -> tuple[float, float, float]:
    """Median over the clients of the seconds a client spends downloading, computing and
    uploading in one round, from its device and the run's real packet sizes (round 1)."""
    from fedbat.assembly import build_datamodule
    from fedbat.devices import build_devices

    first = rows[0]
    contacted = first.get("clients/started") or sum(
        first.get(k, 0) for k in ("clients/accepted", "clients/late", "clients/dropped")
    )
    down = first["bits/downlink"] / contacted
    up = first["bits/uplink"] / max(first["clients/accepted"], 1)
    dm, devices = build_datamodule(cfg), build_devices(cfg, cfg.data.num_clients)
    split = [[], [], []]
    for c in range(cfg.data.num_clients):
        p = devices.profile(c)
        received = p.received(0.0, int(down))
        computed = p.computed(received, cfg.fed.local_epochs * dm.client_size(c))
        for i, (a, b) in enumerate(
            [(0.0, received), (received, computed), (computed, p.uploaded(computed, int(up)))]
        ):
            split[i].append(b - a)
    return tuple(statistics.median(v) for v in split)  # type: ignore[return-value]


def plot(curves: dict[str, list[dict]], target: float, path: Path) -> None:
    """Test accuracy against the virtual clock, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, rows in curves.items():
        rows = [r for r in rows if "test/acc" in r]
        style = "--" if "fedbuff" in name else "-"
        ax.plot([r["sim/clock_s"] / 60 for r in rows], [r["test/acc"] for r in rows], style,
                label=name)  # fmt: skip
    ax.axhline(target, color="grey", lw=0.8)
    ax.set(xlabel="virtual time (min)", ylabel="test accuracy", ylim=(0.3, 0.9))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
