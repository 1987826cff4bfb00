"""A real local Flower deployment: a SuperLink and SuperNodes as separate processes on
127.0.0.1, started by ``fedbat flower``.

They run with FEDBAT_FLOWER_TESTS=1 (``.ci/run`` runs this file so, after the suite);
otherwise they skip with the reason, so that the suite stays fast: every client round is a
fresh ClientApp process (Python, torch and Lightning imported anew), about a minute per
deployment on 2 cores.
"""

import csv
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fedbat.loop import run
from tests.conftest import make_cfg

pytestmark = pytest.mark.skipif(
    not os.environ.get("FEDBAT_FLOWER_TESTS"),
    reason="real Flower deployments take minutes: FEDBAT_FLOWER_TESTS=1 python -m pytest "
    "tests/test_flower_deployment.py (.ci/run does)",
)

JOB = ["fed.rounds=3", "fed.clients_per_round=2", "trainer.threads=1", "model.hidden=1024"]


def deploy(run_dir: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = ["fedbat", "flower", "--supernodes", "3", *JOB, f"run_dir={run_dir}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("compressor", ["none", "fedbat", "ef_signsgd"])
def test_deployment_matches_fedbat_train(tmp_path, compressor):
    """Clients in their own processes, reached over Flower's wire, train exactly what
    ``fedbat train`` trains: the same history, bit for bit (same threads, same CPU). With 2 of
    3 clients a round, clients that sat a round out are sent the broadcast they missed."""
    out = deploy(tmp_path / "flower", f"compressor={compressor}")
    assert out.returncode == 0, out.stdout[-1500:] + out.stderr[-3000:]
    assert "fedbat: done: test/acc final" in out.stdout
    run(make_cfg(tmp_path / "train", *JOB, "data.num_clients=3", f"compressor={compressor}"))
    flower, train = rows(tmp_path / "flower"), rows(tmp_path / "train")
    assert len(flower) == len(train) == 3
    for f, t in zip(flower, train, strict=True):
        for key in ("train/loss", "test/acc", "bits/uplink", "bits/downlink", "clients/accepted"):
            assert f[key] == t[key], (key, f["round"])
        wire, packets = 8 * float(f["flower/uplink_bytes"]), float(f["bits/uplink"])
        assert packets <= wire  # Flower's messages carry the packets and a little more
        if compressor == "fedbat":
            assert wire <= 1.05 * packets, (wire, packets)


def flower_processes() -> list[str]:
    """Flower processes still running (a zombie left to an init that does not reap is not)."""
    ps = subprocess.run(["ps", "-eo", "stat,args"], capture_output=True, text=True).stdout
    return [
        p
        for p in ps.splitlines()
        if ("flower-super" in p or "flwr-" in p) and not p.startswith("Z")
    ]


def wait_rounds(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.csv").is_file() and len(rows(run_dir)) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.3)
    raise AssertionError(f"no round {n} within {timeout} s")


def test_a_killed_client_is_rejected_alone_and_sigterm_stops_cleanly(tmp_path):
    """Kill one SuperNode (and its ClientApp) mid-run: its round completes with the other
    clients and counts the rejection. Then SIGTERM stops the deployment: the checkpoint of
    the last round is kept, no Flower process is left, and the same command resumes."""
    run_dir = tmp_path / "run"
    cmd = ["fedbat", "flower", "--supernodes", "3", "--round-timeout", "30", *JOB]
    cmd += ["fed.clients_per_round=3", "fed.rounds=4", f"run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_rounds(run_dir, 1, proc)
    node = subprocess.run(["pgrep", "-f", "partition-id=1 "], capture_output=True, text=True)
    for pid in node.stdout.split():
        os.killpg(int(pid), signal.SIGKILL)
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:  # Flower streams the ServerApp's output a little late
        seen.append(line)
        if "rejected client 1" in line:
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    stdout = "".join(seen) + stdout
    assert proc.returncode == 143, stderr
    assert "interrupted (SIGTERM); deployment stopped; its checkpoint is intact" in stderr
    assert "rejected client 1: no reply within 30 s" in stdout
    history = rows(run_dir)
    assert history[1]["clients/rejected"] == "1" and history[1]["clients/accepted"] == "2"
    assert all(float(r["test/acc"]) > 0.5 for r in history)
    assert not flower_processes()
    done = len(history)
    out = deploy(run_dir, "fed.clients_per_round=3", "fed.rounds=4")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"after round {done} of 4" in out.stdout
    assert len(rows(run_dir)) == 4 and rows(run_dir)[-1]["clients/rejected"] == "0"
