"""How fedbat meets W&B's own resolution of mode and credentials: real subprocesses, real
offline run files, no network but loopback."""

import http.server
import os
import socket
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test is a fresh fedbat process: .ci/run's slow step


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A user with no W&B state: its own HOME, no key, no mode, no netrc."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "NETRC"))}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {**env, "HOME": str(home), "NETRC": str(home / ".netrc"), **extra}


def train(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "fedbat.cli",
            "train",
            "logger=wandb",
            "fed.rounds=1",
            f"hydra.run.dir={tmp_path / 'run'}",
            "progress=false",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env=env,
    )


def offline_runs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_no_credentials_logs_offline_in_one_line(tmp_path):
    out = train(tmp_path, clean_env(tmp_path))
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("fedbat:")]
    assert len(lines) == 1 and lines[0].startswith("fedbat: no W&B credentials for http"), lines
    assert "wandb sync" in lines[0]
    (run_file,) = offline_runs(tmp_path)
    assert b"test/acc" in run_file.read_bytes()


class Refusing(http.server.BaseHTTPRequestHandler):
    """A self-hosted W&B server that refuses every request (401) at once."""

    def do_POST(self) -> None:
        self.send_response(401)
        self.end_headers()

    do_GET = do_POST

    def log_message(self, *args: object) -> None:
        pass


def test_netrc_credentials_for_a_self_hosted_server_are_found(tmp_path):
    """Credentials in $NETRC for the server wandb is configured for (WANDB_BASE_URL) make
    the run go online; the server refuses them, so it falls back to offline, saying so.
    (A server that does not answer at all takes wandb ~15 s of its own retries.)"""
    server = socketserver.TCPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    env = clean_env(tmp_path, WANDB_BASE_URL=f"http://127.0.0.1:{port}")
    Path(env["NETRC"]).write_text(
        f"machine 127.0.0.1:{port}\n  login user\n  password {'a' * 40}\n"
    )
    os.chmod(env["NETRC"], 0o600)
    out = train(tmp_path, env, "logger.wandb.init_timeout=1")
    assert out.returncode == 0, out.stderr
    assert "no W&B credentials" not in out.stderr
    assert "fedbat: W&B is unreachable" in out.stderr and "error 401" in out.stderr
    assert "logging offline" in out.stderr
    server.shutdown()
    (run_file,) = offline_runs(tmp_path)
    assert b"test/acc" in run_file.read_bytes()


@pytest.mark.parametrize("how", ["config", "wandb-offline"])
def test_users_mode_is_respected(tmp_path, how):
    """logger.wandb.mode, or `wandb offline` in the working directory, decides: offline
    without a word from fedbat, although a key is configured (WANDB_MODE=offline is what
    every other test runs under)."""
    env = clean_env(
        tmp_path, WANDB_API_KEY="a" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{closed_port()}"
    )
    args = []
    if how == "config":
        args = ["logger.wandb.mode=offline"]
    else:
        cmd = [sys.executable, "-m", "wandb", "offline"]
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    out = train(tmp_path, env, *args)
    assert out.returncode == 0, out.stderr
    assert "fedbat:" not in out.stderr
    assert len(offline_runs(tmp_path)) == 1
