"""What several test modules share: reading a run's metrics, the CLI as a subprocess, one
round of real client results, and the comparison of two runs' checkpoints."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import torch

from fedbat import checkpoint, clientstore
from fedbat.assembly import Components, build_components, build_fabric
from fedbat.client import ClientJob, train_client
from fedbat.compressors.packet import pack, unpack
from fedbat.server import Server
from tests.conftest import make_cfg

VOLATILE = ("time/",)  # wall-clock metrics: never equal between two runs


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    """:func:`rows` without the wall-clock metrics."""
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows(run_dir)]


def stable(history: list[dict]) -> list[dict]:
    """A checkpoint's history without the wall-clock metrics."""
    return [{k: v for k, v in h.items() if not k.startswith(VOLATILE)} for h in history]


def fedbat_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m fedbat.cli ARGS`` in ``cwd``, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "fedbat.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def train_command(run_dir: Path, *args: str) -> list[str]:
    """The argv of ``fedbat train`` into ``run_dir``, with progress lines."""
    return [sys.executable, "-m", "fedbat.cli", "train", f"hydra.run.dir={run_dir}",
            "progress=true", *args]  # fmt: skip


def components(tmp_path: Path, *overrides: str) -> Components:
    """A run's parts as ``fedbat train`` builds them, for ``make_cfg``'s config."""
    cfg = make_cfg(tmp_path, *overrides)
    return build_components(cfg, build_fabric(cfg))


def round_results(tmp_path: Path, n: int = 4, *overrides: str):
    """A server (FedBAT unless ``overrides`` say otherwise) and ``n`` real client results of
    round 0 (a small CNN on digits)."""
    parts = components(tmp_path, "compressor=fedbat", "compressor.downlink=none", "model=cnn",
                       *overrides)  # fmt: skip
    server = parts.server()
    jobs = [ClientJob(client=c, round=0, held=server.held) for c in range(n)]
    return server, [train_client(parts.setup, job) for job in jobs]


def forge_raw(data: bytes, server: Server, value: float) -> tuple[bytes, str]:
    """A client's real packet with one element of an uncompressed parameter set to
    ``value`` (finite), and that parameter's name."""
    fields = unpack(data, server.plan, server.uplink)
    name = next(s.name for s in server.plan if not s.compressed and s.name in server.params)
    fields[name]["raw"] = fields[name]["raw"].clone()
    fields[name]["raw"][0] = value
    return pack(fields, server.uplink).data, name


def assert_same_run(one_dir: Path, two_dir: Path) -> None:
    """Same per-round metrics, global and held weights, the downlink's residuals and
    compressor state, and every client's state (error-feedback residuals, compressor state,
    SCAFFOLD's control variates)."""
    one = checkpoint.load(one_dir / "checkpoint.pt")
    two = checkpoint.load(two_dir / "checkpoint.pt")
    assert stable(one["history"]) == stable(two["history"])
    for part in ("global", "held", "held_extra", "memory", "compressor"):
        assert one["server"][part].keys() == two["server"][part].keys(), part
        for k, v in one["server"][part].items():
            assert torch.equal(v, two["server"][part][k]), (part, k)
    ones, twos = clientstore.read(one_dir, one), clientstore.read(two_dir, two)
    assert ones.keys() == twos.keys()  # right whichever rank trained whom
    for k, v in ones.items():
        assert torch.equal(v, twos[k]), k
