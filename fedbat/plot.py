"""``fedbat plot``: accuracy against rounds and against cumulative uplink bits, one line per
run, from the runs' ``metrics.csv`` (run dirs or whole sweep dirs)."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from omegaconf import OmegaConf

from fedbat.errors import ConfigError

COLORS = plt.get_cmap("tab10").colors
STYLES = ("-", "--", ":", "-.")


def find_runs(paths: Iterable[Path]) -> list[Path]:
    """Every folder at or below ``paths`` holding a metrics.csv, sorted."""
    found: set[Path] = set()
    for p in paths:
        if not p.exists():
            raise ConfigError(f"run dir {str(p)!r}: does not exist")
        found |= {m.parent for m in p.rglob("metrics.csv")}
    if not found:
        raise ConfigError(f"no metrics.csv under {', '.join(map(str, paths))}")
    return sorted(found)


def label(run_dir: Path) -> str:
    """The run's compressor (and downlink when it differs), from its saved config."""
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        return run_dir.name
    c = OmegaConf.load(cfg_file).compressor
    down = c.get("downlink")
    down_name = down if isinstance(down, str) or down is None else down.get("name")
    return c.name if down_name in (None, c.name) else f"{c.name} (down: {down_name})"


def run_labels(runs: list[Path]) -> list[str]:
    """:func:`label` of each run; where two share one, each also gets its folder below the
    runs' common parent (``iid/fedbat__none`` vs ``dirichlet/fedbat__none``).

    >>> run_labels([Path("sweep/iid/a"), Path("sweep/dirichlet/a")])
    ['a [iid/a]', 'a [dirichlet/a]']
    """
    labels = [label(r) for r in runs]
    if len(set(labels)) == len(labels):
        return labels
    common = Path(os.path.commonpath([r.absolute() for r in runs]))
    return [
        f"{lab} [{r.absolute().relative_to(common).as_posix() or r.name}]"
        for lab, r in zip(labels, runs, strict=True)
    ]


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "metrics.csv") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def plot_runs(paths: Iterable[Path], out: Path | None = None) -> list[Path]:
    """Write ``acc_vs_round.png`` and ``acc_vs_uplink_bits.png``; return their paths."""
    paths = list(paths)
    runs = find_runs(paths)
    out = out or (paths[0] if len(paths) == 1 and paths[0].is_dir() else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    labels = run_labels(runs)
    written = []
    for x_key, x_label, name, log in (
        ("round", "round", "acc_vs_round.png", False),
        ("bits/uplink_cum", "cumulative uplink bits", "acc_vs_uplink_bits.png", True),
    ):
        fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
        for i, (run_dir, lab) in enumerate(zip(runs, labels, strict=True)):
            rows = [r for r in read_metrics(run_dir) if "test/acc" in r]
            ax.plot(
                [r[x_key] for r in rows],
                [r["test/acc"] for r in rows],
                marker=".",
                label=lab,
                color=COLORS[i % len(COLORS)],
                linestyle=STYLES[i // len(COLORS) % len(STYLES)],  # past 10 runs: new dashes
            )
        ax.set_xlabel(x_label)
        ax.set_ylabel("test accuracy")
        if log:
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        written.append(out / name)
    return written
