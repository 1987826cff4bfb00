"""W&B (a real offline run), CSV values per round, progress off a terminal, plots, sweeps."""

import csv
import io
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import wandb
from omegaconf import OmegaConf

from fedbat import checkpoint
from fedbat.cli import main
from fedbat.errors import ConfigError
from fedbat.lifecycle import run
from fedbat.plot import group_runs
from fedbat.progress import RoundProgress
from tests.conftest import make_cfg
from tests.wandb_records import read_run


@pytest.fixture
def no_network(monkeypatch):
    """Fail any connection from this process to a non-loopback address."""
    attempts: list[object] = []
    real = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if (
            isinstance(host, str)
            and not (host.startswith("127.") or host in ("localhost", "::1"))
            and self.family in (socket.AF_INET, socket.AF_INET6)
        ):
            attempts.append(address)
            raise OSError(f"network access attempted: {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return attempts


def wandb_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_wandb_offline_run_and_csv_values(tmp_path, no_network):
    cfg = make_cfg(
        tmp_path,
        "logger=wandb",
        "compressor=fedbat",
        "compressor.downlink=none",
        "fed.rounds=3",
        "target_acc=0.1",
        "logger.wandb.artifacts=true",
    )
    summary = run(cfg)
    # finish() returns before the W&B service has closed the run file; teardown waits for
    # the service to exit, which is what a finished `fedbat train` process does at exit.
    wandb.teardown()
    (offline,) = wandb_runs(tmp_path)
    (run_file,) = offline.glob("run-*.wandb")
    wb = read_run(run_file)  # wandb's own records, decoded with its protobuf schema
    assert no_network == []
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(wb["history"]) == len(rows) == 3  # each round once, the same values as the CSV
    for logged, row in zip(wb["history"], rows, strict=True):
        for key in ("round", "test/acc", "bits/uplink_cum", "fedbat/alpha/model.1.weight"):
            assert logged[key] == float(row[key]), key
        assert logged["vs_uplink_bits/test/acc"] == logged["test/acc"]
    assert wb["axes"]["test/acc"] == "round"  # every metric's x-axis, defined exactly
    assert wb["axes"]["vs_uplink_bits/test/acc"] == "bits/uplink_cum"
    assert wb["summary"]["best_acc"] == summary["best_acc"]
    assert wb["summary"]["bits_uplink_to_target"] == summary["bits_uplink_to_target"]
    assert wb["config"]["compressor"]["name"] == "fedbat"
    files = ["checkpoint.pt", "config.yaml", "summary.json"]  # the opt-in artifact
    assert wb["artifacts"] == [(f"run-{offline.name[-8:]}", "run", files)]
    assert [int(float(r["round"])) for r in rows] == [1, 2, 3]
    up = [int(float(r["bits/uplink"])) for r in rows]
    assert len(set(up)) == 1  # fixed-size packets: 10 clients x the same bytes each round
    cum = [int(float(r["bits/uplink_cum"])) for r in rows]
    assert cum == [up[0], 2 * up[0], 3 * up[0]]
    assert float(rows[0]["compression/uplink_ratio"]) > 10
    assert 5e-4 <= float(rows[0]["fedbat/alpha/model.1.weight"]) <= 5e-2
    assert summary["bits_uplink_to_target"] == up[0]  # 10% accuracy reached after round 0
    assert summary["best_acc"] == max(float(r["test/acc"]) for r in rows)


def test_resumed_run_continues_the_same_wandb_run(tmp_path):
    run(make_cfg(tmp_path, "logger=wandb", "fed.rounds=2"))
    first = checkpoint.load(tmp_path / "checkpoint.pt")["wandb_id"]
    run(make_cfg(tmp_path, "logger=wandb", "fed.rounds=3"))
    assert checkpoint.load(tmp_path / "checkpoint.pt")["wandb_id"] == first
    names = [p.name for p in wandb_runs(tmp_path)]
    assert len(names) == 2 and all(f"-{first}" in n for n in names), (first, names)


def test_progress_plain_lines_off_a_terminal():
    out = io.StringIO()
    progress = RoundProgress(total=2, stream=out)
    for r in range(2):
        progress.update(
            {
                "round": r,
                "test/acc": 0.5,
                "train/loss": 1.0,
                "bits/uplink_cum": 1e6,
                "bits/downlink_cum": 2e6,
                "time/round_s": 0.1,
            }
        )
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("round 2/2 | acc 0.5000")
    assert "\x1b[" not in out.getvalue()


def test_plot_two_real_runs(tmp_path):
    for name in ("none", "signsgd"):
        run(make_cfg(tmp_path / "runs" / name, f"compressor={name}", "fed.rounds=2"))
    assert main(["plot", str(tmp_path / "runs"), "-o", str(tmp_path / "png")]) == 0
    for png in ("acc_vs_round.png", "acc_vs_uplink_bits.png"):
        img = mpimg.imread(tmp_path / "png" / png)
        assert img.shape[:2] == (500, 800)
    assert main(["plot", str(tmp_path / "nothing")]) == 2


@pytest.mark.slow
def test_multirun_sweep_grouped_then_plotted(tmp_path):
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedbat.cli",
            "train",
            "--multirun",
            "compressor=none,signsgd",
            "fed.rounds=2",
            "logger=wandb",
            f"hydra.sweep.dir={sweep}",
            "progress=false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert out.returncode == 0, out.stderr
    runs = sorted(p.parent for p in sweep.rglob("metrics.csv"))
    assert len(runs) == 2
    # grouped by configuration (seeds would aggregate, compressors never); the sweep in tags
    cfgs = [OmegaConf.load(r / "config.yaml").logger.wandb for r in runs]
    assert {c.group for c in cfgs} == {
        "compressor=none,fed.rounds=2",
        "compressor=signsgd,fed.rounds=2",
    }
    assert all(list(c.tags) == ["sweep-sweep"] for c in cfgs)
    for r in runs:  # the finished process has flushed each run's file, metrics included
        (offline,) = wandb_runs(r)
        (run_file,) = offline.glob("run-*.wandb")
        assert b"test/acc" in run_file.read_bytes()
    assert main(["plot", str(sweep)]) == 0
    assert (sweep / "acc_vs_uplink_bits.png").is_file()


def test_switching_a_csv_run_to_wandb_replays_its_history(tmp_path):
    """A finished CSV run continued with logger=wandb: the new W&B run gets every round's
    curve, the earlier rounds replayed from the checkpoint's history."""
    run(make_cfg(tmp_path, "fed.rounds=2"))
    run(make_cfg(tmp_path, "fed.rounds=3", "logger=wandb"))
    wandb.teardown()
    (offline,) = wandb_runs(tmp_path)
    (run_file,) = offline.glob("run-*.wandb")
    logged = read_run(run_file)["history"]
    history = checkpoint.load(tmp_path / "checkpoint.pt")["history"]
    assert len(history) == len(logged) == 3  # rounds 1 and 2 replayed, round 3 trained now
    for row, got in zip(history, logged, strict=True):
        assert (got["round"], got["test/loss"]) == (row["round"], row["test/loss"])
        assert got["vs_uplink_bits/test/acc"] == row["test/acc"]


@pytest.mark.slow
def test_version_and_the_line_a_finished_run_ends_with(tmp_path, capsys):
    from tests.helpers import fedbat_cli

    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("fedbat 0.")
    out = fedbat_cli("train", "fed.rounds=2", "progress=false", cwd=tmp_path)
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("fedbat: done: test/acc final 0.") and "| up " in last
    assert last.endswith("runs/digits_mlp_none")  # fed.rounds does not name the run dir
    # raising fed.rounds extends the same run (the run dir is not named by it)
    more = fedbat_cli("train", "fed.rounds=3", "progress=false", cwd=tmp_path)
    assert "after round 2 of 3" in more.stdout + more.stderr
    rows = (tmp_path / "runs" / "digits_mlp_none" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3


@pytest.mark.parametrize("width", [80, 140])
def test_progress_bar_keeps_its_bar_and_eta_on_a_narrow_terminal(width):
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=True, color_system=None)
    progress = RoundProgress(total=30, console=console)
    metrics = {
        "test/acc": 0.9583,
        "train/loss": 0.1234,
        "bits/uplink_cum": 93.22e6,
        "bits/downlink_cum": 93.22e6,
        "time/round_s": 0.03,
    }
    for _ in range(15):
        progress.update(metrics)
    progress.close()
    lines = out.getvalue().replace("\r", "\n").splitlines()
    last = [ln for ln in lines if "round 15/30" in ln][-1]
    assert "━" in last and "…" not in last, last  # the bar, and nothing cut off
    assert re.search(r"(\d+:\d\d:\d\d|-:--:--)\s*$", last), last  # the ETA, last
    assert "acc 0.9583" in last and "up 93.22 Mb" in last
    assert ("down 93.22 Mb" in last) == (width >= 110)


def test_plot_and_compare_aggregate_seeds_and_label_by_what_differs(tmp_path, capsys):
    for name in ("none", "signsgd"):
        for seed in (0, 1):
            run(
                make_cfg(tmp_path / "runs" / f"{name}_{seed}", f"compressor={name}", f"seed={seed}")
            )
    out = tmp_path / "figs"
    args = ["plot", str(tmp_path / "runs"), "-o", str(out), "--x", "round,total"]
    assert main([*args, "--format", "png,pdf,svg"]) == 0
    assert (out / "acc_vs_total.pdf").read_bytes().startswith(b"%PDF")
    assert mpimg.imread(out / "acc_vs_round.png").shape[:2] == (500, 800)
    svg = (out / "acc_vs_round.svg").read_text()
    for text in ("compressor=none (2 seeds)", "compressor=signsgd (2 seeds)"):
        assert text in svg  # labels: only the key that differs; seeds aggregated
    assert "digits | mlp | iid, 20 clients" in svg  # the title: what every run shares
    assert svg.count("PolyCollection") >= 2  # the ± sd bands
    assert main([*args, "--x", "epochs"]) == 2
    assert (
        "--x 'epochs': must be one of round, uplink, downlink, total, comm"
        in capsys.readouterr().err
    )

    capsys.readouterr()
    assert main(["compare", str(tmp_path / "runs"), "--target", "0.05"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| configuration | seeds | final acc | best acc |")
    rows = {r.split(" | ")[0][2:]: r for r in table[2:]}
    assert set(rows) == {"compressor=none (2 seeds)", "compressor=signsgd (2 seeds)"}
    assert (
        " | 2 | " in rows["compressor=none (2 seeds)"]
        and " ± " in rows["compressor=none (2 seeds)"]
    )
    assert "(acc 0.05)" in rows["compressor=signsgd (2 seeds)"]
    assert main(["compare", str(tmp_path / "runs"), "--target", "0.999"]) == 0
    assert "not reached (0/2 seeds reach 0.999)" in capsys.readouterr().out


def test_simulated_communication_time_from_the_real_packet_sizes(tmp_path, capsys):
    """1 Mbit/s up, 10 down, 50 ms: a round takes its slowest client's two latencies plus
    the broadcast down and its own packet up; FedBAT's 1-bit uplink makes rounds faster."""
    net = ["network.uplink_mbps=1", "network.downlink_mbps=10", "network.latency_ms=50"]
    for name in ("none", "fedbat"):
        run(make_cfg(tmp_path / name, f"compressor={name}", "compressor.downlink=none", *net))
    rows = {
        n: checkpoint.load(tmp_path / n / "checkpoint.pt")["history"] for n in ("none", "fedbat")
    }
    for row in rows["none"]:  # equal packets: every client is the slowest
        up = row["bits/uplink"] / 10
        down = row["bits/downlink"] / 10
        assert row["sim/comm_s"] == pytest.approx(0.1 + down / 10e6 + up / 1e6, rel=1e-12)
    assert rows["none"][-1]["sim/comm_cum_s"] == pytest.approx(
        sum(r["sim/comm_s"] for r in rows["none"])
    )
    assert rows["fedbat"][0]["sim/comm_s"] < 0.5 * rows["none"][0]["sim/comm_s"]
    # log-normal spread: per-client links, fixed by (seed, client), slower for someone
    run(make_cfg(tmp_path / "spread", "compressor=none", *net, "network.spread=1.0"))
    spread = checkpoint.load(tmp_path / "spread" / "checkpoint.pt")["history"]
    assert [r["sim/comm_s"] for r in spread] != [r["sim/comm_s"] for r in rows["none"]]
    assert main(["plot", str(tmp_path), "--x", "comm", "-o", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "acc_vs_comm.png").is_file()
    bad = make_cfg(tmp_path / "bad", "network.uplink_mbps=1")
    with pytest.raises(ConfigError, match=r"network\.uplink_mbps: set both"):
        run(bad)


def test_wandb_sweep_yaml_gives_commands_fedbat_accepts():
    """The agent's command for every grid point (``${args_no_hyphens}``: key=value pairs)
    composes and validates; the agent itself needs a W&B server, which tests do not reach."""
    import itertools

    from fedbat.compose import prevalidate

    spec = OmegaConf.to_container(OmegaConf.load("examples/wandb_sweep.yaml"))
    command = spec["command"]
    assert command[:3] == ["${env}", "fedbat", "train"] and command[-1] == "${args_no_hyphens}"
    params = spec["parameters"]
    grid = [[(k, v) for v in p.get("values", [p.get("value")])] for k, p in params.items()]
    points = list(itertools.product(*grid))
    assert len(points) == 12
    for point in points[:: len(params["seed"]["values"])]:  # each compressor once
        args = [*command[3:-1], *(f"{k}={v}" for k, v in point)]
        assert prevalidate(args, check_run_dir=False) is None, args


def test_plot_labels_group_records_written_by_different_fedbat_versions():
    """The equal-bits records were written over months: a newer fedbat's config.yaml has
    keys an older one lacks, so grouping by config splits one compressor's two seeds and
    labels each curve by every key that changed. ``labels`` groups and names them as the
    caller knows them (real records from docs/data)."""
    root = Path(__file__).parent.parent / "docs" / "data" / "equal_bits" / "iid"
    runs = [root / name / f"seed{s}" for name in ("eden-4", "none") for s in (0, 1)]
    assert len(group_runs(runs)) == 4  # the defect: seeds apart, labels of changed keys
    grouped = group_runs(runs, {r: r.parent.name for r in runs})
    assert [(g.label, g.runs) for g in grouped] == [
        ("eden-4 (2 seeds)", runs[:2]),
        ("none (2 seeds)", runs[2:]),
    ]
