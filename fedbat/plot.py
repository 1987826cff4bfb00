"""``fedbat plot`` and ``fedbat compare``: runs read back from their ``metrics.csv`` and
``config.yaml`` (run dirs or whole sweep dirs). Runs that differ only in their seed are one
configuration: plotted as the mean with a band of one standard deviation, and one row of
the comparison table. Labels name only the config keys that differ between
configurations; the title names what they share (dataset, model, partition)."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from omegaconf import OmegaConf

from fedbat.config import RESULT_FREE, is_free
from fedbat.errors import ConfigError
from fedbat.rundir import CONFIG, METRICS

COLORS = plt.get_cmap("tab10").colors
STYLES = ("-", "--", ":", "-.")
X_AXES = {  # --x choice: (metric, axis label, log scale)
    "round": ("round", "round", False),
    "uplink": ("bits/uplink_cum", "cumulative uplink bits", True),
    "downlink": ("bits/downlink_cum", "cumulative downlink bits", True),
    "total": ("bits/total_cum", "cumulative bits, both ways", True),
    "comm": ("sim/comm_cum_s", "simulated communication time (s)", False),
    "time": ("sim/clock_s", "virtual time (s): devices, links, round policy", False),
}
FORMATS = ("png", "pdf", "svg")
# Keys that never tell configurations apart: the result-free ones, and the seed (the runs
# of one configuration differ by it)
IGNORED = (*RESULT_FREE, "seed")


def find_runs(paths: Iterable[Path]) -> list[Path]:
    """Every folder at or below ``paths`` holding a metrics.csv, sorted."""
    paths = list(paths)
    found: set[Path] = set()
    for p in paths:
        if not p.exists():
            raise ConfigError(f"run dir {str(p)!r}: does not exist")
        found |= {m.parent for m in p.rglob(METRICS)}
    if not found:
        raise ConfigError(f"no metrics.csv under {', '.join(map(str, paths))}")
    return sorted(found)


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / METRICS) as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def flat_config(run_dir: Path) -> dict[str, Any]:
    """The run's config as ``{dotted.key: value}`` (empty without a config.yaml)."""
    path = run_dir / CONFIG
    if not path.is_file():
        return {}
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(OmegaConf.load(path)), "")
    return out


@dataclass
class Config:
    """One configuration: its runs (one per seed) and what tells it apart."""

    runs: list[Path]
    config: dict[str, Any]
    label: str = ""

    @cached_property
    def metrics(self) -> list[list[dict[str, float]]]:
        return [read_metrics(r) for r in self.runs]


def group_runs(runs: list[Path], labels: Mapping[Path, str] | None = None) -> list[Config]:
    """Runs grouped by their config without the seed; labelled by the keys that differ.
    With ``labels`` (run dir -> name), grouped and labelled by name instead.

    Runs without a config.yaml are their own configuration, labelled by their folder.
    """
    groups: dict[str, Config] = {}
    for run_dir in runs:
        cfg = {k: v for k, v in flat_config(run_dir).items() if not is_free(k, IGNORED)}
        key = repr(sorted(cfg.items())) if cfg else str(run_dir)
        key = labels[run_dir] if labels is not None else key
        groups.setdefault(key, Config([], cfg)).runs.append(run_dir)
    out = list(groups.values())
    keys = sorted({k for g in out for k in g.config})
    differ = [k for k in keys if len({repr(g.config.get(k)) for g in out}) > 1]
    named = {k[: -len(".name")] for k in differ if k.endswith(".name")}  # compressor, model
    differ = [k for k in differ if k.endswith(".name") or k.rpartition(".")[0] not in named]
    for g in out:
        parts = [f"{_short(k)}={g.config.get(k)}" for k in differ]
        g.label = ", ".join(parts) if g.config and parts else g.runs[0].name
        if labels is not None:
            g.label = labels[g.runs[0]]
        if len(g.runs) > 1:
            g.label += f" ({len(g.runs)} seeds)"
    return out


def _short(key: str) -> str:
    """``compressor.name`` -> ``compressor``: a group's name is the group."""
    return key[: -len(".name")] if key.endswith(".name") else key


def title(groups: list[Config]) -> str:
    """Dataset, model and partition, where every configuration shares them."""

    def shared(key: str) -> Any:
        values = {repr(g.config.get(key)) for g in groups}
        return groups[0].config.get(key) if len(values) == 1 else None

    partition = shared("data.partition")
    if partition == "dirichlet" and shared("data.alpha") is not None:
        partition = f"Dir({shared('data.alpha')})"
    clients = shared("data.num_clients")
    parts = [
        shared("data.name") or shared("datamodule._target_"),
        shared("model.name") or shared("task._target_"),
        partition and (f"{partition}, {clients} clients" if clients else partition),
    ]
    return " | ".join(str(p) for p in parts if p)


def curve(config: Config, x_key: str) -> tuple[list[float], list[float], list[float]]:
    """x, mean and sd of test/acc over the configuration's seeds, at the rounds they all
    evaluated."""
    per_run = [{r["round"]: r for r in rows if "test/acc" in r} for rows in config.metrics]
    rounds = sorted(set.intersection(*(set(m) for m in per_run)))
    xs, means, sds = [], [], []
    for rnd in rounds:
        accs = [m[rnd]["test/acc"] for m in per_run]
        xs.append(statistics.mean(m[rnd].get(x_key, math.nan) for m in per_run))
        means.append(statistics.mean(accs))
        sds.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
    return xs, means, sds


def plot_runs(
    paths: Iterable[Path],
    out: Path | None = None,
    axes: Iterable[str] = ("round", "uplink"),
    formats: Iterable[str] = ("png",),
    title_text: str | None = None,
    labels: Mapping[Path, str] | None = None,
) -> list[Path]:
    """Write ``acc_vs_<axis>.<format>`` for each axis and format; return their paths.
    ``labels`` names each run's configuration (runs of one name are its seeds) where the
    caller knows it better than the configs can say: records of one experiment written by
    fedbat versions whose configs have different keys."""
    paths = list(paths)
    axes, formats = list(axes), list(formats)
    for name, allowed, given in (("--x", X_AXES, axes), ("--format", FORMATS, formats)):
        if bad := [a for a in given if a not in allowed]:
            raise ConfigError(f"{name} {bad[0]!r}: must be one of {', '.join(allowed)}")
    if out is not None and (out.suffix.lstrip(".") in FORMATS or out.is_file()):
        raise ConfigError(
            f"--out {out}: must be a folder (it receives acc_vs_<axis>.<format> files), "
            "e.g. --out plots"
        )
    groups = group_runs(find_runs(paths), labels)
    out = out or (paths[0] if len(paths) == 1 and paths[0].is_dir() else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    heading = title(groups) if title_text is None else title_text
    written = []
    for axis in axes:
        x_key, x_label, log = X_AXES[axis]
        fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
        for i, g in enumerate(groups):
            xs, means, sds = curve(g, x_key)
            color = COLORS[i % len(COLORS)]
            style = STYLES[i // len(COLORS) % len(STYLES)]  # past 10 lines: new dashes
            ax.plot(xs, means, marker=".", label=g.label, color=color, linestyle=style)
            if len(g.runs) > 1:
                low = [m - s for m, s in zip(means, sds, strict=True)]
                high = [m + s for m, s in zip(means, sds, strict=True)]
                ax.fill_between(xs, low, high, color=color, alpha=0.2, linewidth=0)
        ax.set_xlabel(x_label)
        ax.set_ylabel("test accuracy")
        if heading:
            ax.set_title(heading)
        if log:
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = "acc_vs_uplink_bits" if axis == "uplink" else f"acc_vs_{axis}"
        for fmt in formats:
            fig.savefig(out / f"{name}.{fmt}")
            written.append(out / f"{name}.{fmt}")
        plt.close(fig)
    return written


def compare(paths: Iterable[Path], target: float | None = None) -> str:
    """A Markdown table, one row per configuration (mean ± sd over seeds): final and best
    test accuracy, uplink bits to reach ``target`` (else the runs' ``target_acc``), total
    bits each way, seconds per round, and with a virtual clock (``system.*``, ``network.*``)
    the virtual time to the target and in all."""
    groups = group_runs(find_runs(paths))
    lines = [
        "| configuration | seeds | final acc | best acc | uplink bits to target | "
        "uplink bits | downlink bits | s/round | virtual s to target | virtual s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        metrics = g.metrics
        goal = target if target is not None else g.config.get("target_acc")
        evals = [[r for r in rows if "test/acc" in r] for rows in metrics]
        if not all(evals):
            raise ConfigError(f"run dir {str(g.runs[0])!r}: no evaluated round in metrics.csv")
        timed = all("sim/clock_s" in rows[-1] for rows in metrics)
        cells = [
            _stat([e[-1]["test/acc"] for e in evals], "{:.4f}"),
            _stat([max(r["test/acc"] for r in e) for e in evals], "{:.4f}"),
            _to_target(evals, goal, "bits/uplink_cum", "{:.3g}"),
            _stat([rows[-1]["bits/uplink_cum"] for rows in metrics], "{:.3g}"),
            _stat([rows[-1]["bits/downlink_cum"] for rows in metrics], "{:.3g}"),
            _stat([statistics.mean(r["time/round_s"] for r in rows) for rows in metrics], "{:.2f}"),
            _to_target(evals, goal, "sim/clock_s", "{:.1f}") if timed else "n/a",
            _stat([rows[-1]["sim/clock_s"] for rows in metrics], "{:.1f}") if timed else "n/a",
        ]
        lines.append(f"| {g.label} | {len(g.runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _stat(values: list[float], fmt: str) -> str:
    """``mean ± sd`` (``mean`` alone for one run)."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def _to_target(evals: list[list[dict[str, float]]], goal: float | None, key: str, fmt: str) -> str:
    """``key`` (cumulative bits, the clock) when the test accuracy first reached ``goal``."""
    if goal is None:
        return "n/a"
    hits = [next((r[key] for r in e if r["test/acc"] >= goal), None) for e in evals]
    if any(h is None for h in hits):
        reached = sum(h is not None for h in hits)
        return f"not reached ({reached}/{len(hits)} seeds reach {goal})"
    return f"{_stat(hits, fmt)} (acc {goal})"  # type: ignore[arg-type]
