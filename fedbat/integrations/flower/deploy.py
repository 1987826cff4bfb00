"""``fedbat flower``: a real local Flower deployment of a fedbat job, started and torn down.

A SuperLink and N SuperNodes run as separate processes on 127.0.0.1 (SuperNode i serves
fedbat client i); ``flwr run`` submits the fedbat Flower app (``server_app`` and
``client_app``) with the job's resolved config, and the ServerApp writes the same run dir as
``fedbat train``. Every process is stopped at the end, on an error and on SIGTERM / Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

APP_TOML = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedbat-flower"
version = "{version}"
description = "fedbat on Flower: compressed federated learning"
license = "MIT"
dependencies = []  # fedbat[flower] is installed on every node

[tool.flwr.app]
publisher = "fedbat"

[tool.flwr.app.components]
serverapp = "fedbat.integrations.flower.server_app:app"
clientapp = "fedbat.integrations.flower.client_app:app"

[tool.flwr.app.config]
round-timeout = {timeout}
config = {config}
"""


class Stop(Exception):
    """SIGTERM while the deployment runs."""


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="fedbat flower",
        description="Run a fedbat job on a local Flower deployment (SuperLink + SuperNodes "
        "on 127.0.0.1); the other arguments are `fedbat train` overrides.",
    )
    parser.add_argument("--supernodes", type=int, default=3, help="clients, one SuperNode each")
    parser.add_argument(
        "--round-timeout", type=float, default=600.0, help="seconds to wait for replies"
    )
    return parser.parse_known_args(argv)


def job_config(overrides: list[str], supernodes: int) -> DictConfig:
    """The resolved job: ``fedbat train``'s config with one client per SuperNode (and at
    most all of them a round unless ``fed.clients_per_round`` is given), and a run dir under
    ``runs/flower/`` unless ``run_dir`` is given."""
    from fedbat.cli import compose

    cfg = compose(overrides)
    if cfg.data.num_clients != supernodes and any(
        o.startswith("data.num_clients=") for o in overrides
    ):
        from fedbat.errors import ConfigError

        raise ConfigError(
            f"data.num_clients={cfg.data.num_clients}: a deployment has one client per "
            f"SuperNode; leave it out or set --supernodes {cfg.data.num_clients}"
        )
    cfg.data.num_clients = supernodes
    if not any(o.startswith("fed.clients_per_round=") for o in overrides):
        cfg.fed.clients_per_round = min(cfg.fed.clients_per_round, supernodes)
    if cfg.run_dir is None:
        kept = sorted(o for o in overrides if not o.startswith(("data.num_clients", "progress")))
        name = f"{cfg.data.name}_{cfg.model.name}_{cfg.compressor.name}"
        cfg.run_dir = str(Path("runs", "flower", name, ",".join(kept) or "default"))
    cfg.run_dir = str(Path(cfg.run_dir).resolve())
    cfg.progress = False  # the ServerApp's output is Flower's log stream, not a terminal
    return cfg


def check_run_dir(cfg: DictConfig) -> None:
    """Fail before any process starts where the ServerApp would: a run dir that cannot be
    written or is held by another run, a checkpoint of another job. A dir created only for
    this check is removed again."""
    from fedbat import rundir
    from fedbat.errors import ConfigError
    from fedbat.loop import resume_state

    run_dir = Path(cfg.run_dir)
    created = not run_dir.exists()
    rundir.prepare(run_dir)
    try:
        with rundir.RunDirLock(run_dir):
            resume_state(cfg, run_dir)
    except ConfigError:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {tail(log)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within 60 s")


def tail(log: Path, lines: int = 5) -> str:
    text = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    return " | ".join(text[-lines:])


class Deployment:
    """The SuperLink and SuperNodes of one local deployment, each its own process group."""

    def __init__(self, supernodes: int, work: Path) -> None:
        self.work, self.n, self.procs = work, supernodes, {}
        self.port = free_port()

    def start(self) -> None:
        host = ["--insecure", "--host", "127.0.0.1", "--port", str(self.port)]
        link = self._spawn(
            "superlink", ["flower-superlink", *host, "--disable-runtime-dependency-installation"]
        )
        wait_listening(self.port, link, "the SuperLink", self.work / "superlink.log")
        for i in range(self.n):
            node_config = f"partition-id={i} num-partitions={self.n}"
            link_at = ["--insecure", "--superlink", f"127.0.0.1:{self.port}"]
            own = ["--port", str(free_port()), "--node-config", node_config]
            self._spawn(f"supernode-{i}", ["flower-supernode", *link_at, *own])

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        home = self.work / name
        home.mkdir(exist_ok=True)
        env = os.environ | {"FLWR_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        log = open(self.work / f"{name}.log", "w")  # noqa: SIM115  (the process keeps it)
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        self.procs[name] = proc
        return proc

    def submit(self, app: Path) -> subprocess.Popen:
        """``flwr run`` against this SuperLink, streaming the run's log."""
        home = self.work / "cli"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "local"\n\n[superlink.local]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        env = os.environ | {"FLWR_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        cmd = ["flwr", "run", str(app), "local", "--stream"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # fmt: skip
        self.procs["flwr-run"] = proc
        return proc

    def stop(self) -> None:
        """SIGTERM to every process of the deployment and their descendants (Flower's
        SuperExec runs the apps in sessions of their own), then SIGKILL what is left after
        10 s: the ServerApp holds the run dir until it exits."""
        pids = descendants([p.pid for p in self.procs.values()])
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while (alive := [p for p in pids if _running(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in alive:
            _signal(pid, signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait()
        while any(_running(p) for p in alive) and time.monotonic() < deadline + 5:
            time.sleep(0.1)


def descendants(roots: list[int]) -> list[int]:
    """``roots`` and every process below them (from ``ps``: Linux and macOS)."""
    table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in table.splitlines():
        pid, ppid = (int(v) for v in line.split())
        children.setdefault(ppid, []).append(pid)
    out, stack = [], list(roots)
    while stack:
        out.append(pid := stack.pop())
        stack += children.get(pid, [])
    return out


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for an init that may not reap)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rpartition(")")[2].split()[0] != "Z"
    return True


def write_app(cfg: DictConfig, timeout: float, where: Path) -> Path:
    """The Flower app to submit: only its pyproject.toml (the code is the installed fedbat),
    with the job's resolved config as a run-config value."""
    from fedbat import __version__

    app = where / "app"
    app.mkdir()
    config = json.dumps(OmegaConf.to_yaml(cfg, resolve=True))  # a valid TOML basic string
    (app / "pyproject.toml").write_text(
        APP_TOML.format(version=__version__, timeout=timeout, config=config)
    )
    return app


def main(argv: list[str]) -> int:
    from fedbat.cli import fail, prevalidate
    from fedbat.errors import ConfigError
    from fedbat.train import done_line

    ns, overrides = parse(argv)
    if ns.supernodes < 1 or ns.round_timeout <= 0:
        return fail(
            f"--supernodes={ns.supernodes} --round-timeout={ns.round_timeout:g}: "
            "must be >= 1 and > 0"
        )
    if shutil.which("flower-superlink") is None:
        return fail('flower: Flower is not installed; pip install "fedbat[flower]"')
    given = any(o.startswith("fed.clients_per_round=") for o in overrides)
    fits = [] if given else ["fed.clients_per_round=1"]  # set below: at most every node
    problem = prevalidate([*overrides, f"data.num_clients={ns.supernodes}", *fits])
    if problem:
        return fail(problem)
    try:
        cfg = job_config(overrides, ns.supernodes)
        check_run_dir(cfg)
    except ConfigError as err:
        return fail(str(err))
    work = Path(tempfile.mkdtemp(prefix="fedbat-flower-"))
    deployment = Deployment(ns.supernodes, work)
    started = time.time()

    def on_sigterm(signum: int, frame: object) -> None:
        raise Stop

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    code = 1
    try:
        deployment.start()
        run = deployment.submit(write_app(cfg, ns.round_timeout, work))
        assert run.stdout is not None
        error = ""
        with open(work / "run.log", "w") as log:  # the run's whole stream, for a failure
            for line in run.stdout:
                log.write(line)
                if line.startswith("fedbat: error:"):
                    error = line
                    print(line, end="", file=sys.stderr, flush=True)
                elif line.startswith(("fedbat:", "round ", "resuming")):
                    print(line, end="", flush=True)
        run.wait()
        summary_path = Path(cfg.run_dir) / "summary.json"
        if summary_path.is_file() and summary_path.stat().st_mtime >= started:
            print(done_line(json.loads(summary_path.read_text()), cfg.run_dir))
            code = 0
        elif error:  # the ServerApp refused the job, and said why in one line
            return 2
        else:
            why = tail(work / "run.log", 3)
            print(f"fedbat: error: the Flower run did not finish ({why}); logs in {work}",
                  file=sys.stderr)  # fmt: skip
            return 1
    except (Stop, KeyboardInterrupt) as stop:
        name = "SIGTERM" if isinstance(stop, Stop) else "SIGINT"
        ckpt = Path(cfg.run_dir) / "checkpoint.pt"
        kept = "its checkpoint is intact: rerun to resume" if ckpt.is_file() else "no checkpoint"
        print(f"fedbat: interrupted ({name}); deployment stopped; {kept}", file=sys.stderr)
        code = 143 if name == "SIGTERM" else 130
    except RuntimeError as err:
        print(f"fedbat: error: flower: {err}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        deployment.stop()
        if code == 0:
            shutil.rmtree(work, ignore_errors=True)
    return code
