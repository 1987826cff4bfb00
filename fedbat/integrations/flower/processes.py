"""The processes of a local Flower deployment: a SuperLink and N SuperNodes on 127.0.0.1,
each its own process group marked for the guard (``watchdog.py``), ``flwr run`` against
them, a watch that ends the run when the SuperLink dies, and the teardown."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedbat.integrations.flower import warm, watchdog
from fedbat.integrations.flower.app import flwr_config
from fedbat.integrations.flower.security import Credentials

POLL = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's, in seconds: a task waits half of it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortTaken(RuntimeError):
    """Another process bound the port between our choosing it and the SuperLink binding it."""


def wait_serving(port: int, proc: subprocess.Popen, what: str, log: Path) -> None:
    """Until ``proc`` itself serves on ``port`` (its log says so: a squatter answering on
    the port does not count)."""
    serving = re.compile(rf"running on https?://127\.0\.0\.1:{port}\b")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.is_file() else ""
        if serving.search(text):
            return
        if proc.poll() is not None:
            if "address already in use" in text.lower() or "errno 98" in text.lower():
                raise PortTaken(f"127.0.0.1:{port} is in use by another process")
            raise RuntimeError(f"{what} exited with {proc.returncode}: {tail(log)}")
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not serve on 127.0.0.1:{port} within 60 s: {tail(log)}")


def tail(log: Path, lines: int = 5) -> str:
    """The last ``lines`` of a log, on one line, without terminal colour codes."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    return " | ".join(plain(text).splitlines()[-lines:])


def plain(text: str) -> str:
    """``text`` without terminal colour codes, stripped."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text).strip()


def _die_with_parent() -> None:
    """In a child, before exec: SIGKILL when the launcher dies (Linux's PR_SET_PDEATHSIG),
    besides the guard (``watchdog.py``), which reaches the grandchildren too."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass  # not Linux: the guard alone


class Deployment:
    """The SuperLink and SuperNodes of one local deployment, each its own process group,
    every process marked for the guard. The SuperLink serves TLS with ``creds``'s
    certificate and accepts only the SuperNodes whose public keys are registered with it
    (each node's, before the nodes start); everything that talks to it verifies the CA."""

    def __init__(
        self,
        supernodes: int,
        work: Path,
        creds: Credentials,
        states: Path | None = None,
        data: Path | None = None,
        warm_clients: bool = True,
    ) -> None:
        self.work, self.n, self.procs, self.creds = work, supernodes, {}, creds
        self.states = states  # node i keeps its state in states/node-<i> (None: its context)
        self.data = data  # node i trains on data/node-<i> alone (None: its partition)
        self.warm_clients = warm_clients  # apps forked from a warm server (warm.py)
        self.socket: Path | None = None  # that server's
        self.token = secrets.token_hex(8)
        self.guard = subprocess.Popen(
            [sys.executable, "-m", "fedbat.integrations.flower.watchdog", self.token],
            stdin=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip

    def start(self, tries: int = 3) -> None:
        """The SuperLink, the nodes' keys registered, the SuperNodes; with ``warm_clients``,
        their ClientApps and the ServerApp are forks of a server that imported the stack once
        (``warm.py``)."""
        if self.warm_clients:  # it imports while the SuperLink starts
            self.socket = Path(tempfile.mkdtemp(prefix="fedbat-warm-")) / "socket"  # 0700
            server = [sys.executable, "-m", "fedbat.integrations.flower.warm"]
            self._spawn("warm", [*server, str(self.socket), str(self.work / "bin")])
        for attempt in range(tries):
            self.port = free_port()
            tls = ["--ssl-ca-certfile", str(self.creds.ca), "--ssl-certfile",
                   str(self.creds.cert), "--ssl-keyfile", str(self.creds.key)]  # fmt: skip
            host = ["--host", "127.0.0.1", "--port", str(self.port), "--enable-supernode-auth"]
            link = self._spawn(
                "superlink",
                ["flower-superlink", *tls, *host, "--disable-runtime-dependency-installation"],
            )
            try:
                wait_serving(self.port, link, "the SuperLink", self.work / "superlink.log")
                break
            except PortTaken:
                link.wait()
                if attempt + 1 == tries:
                    raise
        self._register(range(self.n))
        deadline = time.monotonic() + 60
        while self.socket and not self.socket.exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # until it serves (its stand-in runs Flower's own command before)
        for i in range(self.n):
            self.start_supernode(f"supernode-{i}", i, self.creds.ca, self.creds.node_key(i))

    def start_supernode(self, name: str, i: int, ca: Path, key: Path) -> subprocess.Popen:
        """SuperNode ``name`` serving partition ``i``, trusting ``ca``, signing with ``key``."""
        node_config = f"partition-id={i} num-partitions={self.n}"
        for option, root in (("state-dir", self.states), ("data-root", self.data)):
            if root is not None:  # a TOML literal string: a quote is refused before
                node_config += f" {option}='{root.resolve() / f'node-{i}'}'"
        link_at = ["--superlink", f"127.0.0.1:{self.port}", "--root-certificates", str(ca)]
        own = ["--auth-supernode-private-key", str(key), "--port", str(free_port())]
        return self._spawn(name, ["flower-supernode", *link_at, *own, "--node-config", node_config])

    def _register(self, nodes: range) -> None:
        """``flwr supernode register`` of each node's public key, all at once."""
        env = self.env(self._cli_home())
        regs = [self._register_one(i, env) for i in nodes]
        for i, reg in zip(nodes, regs, strict=True):
            out, _ = reg.communicate(timeout=120)
            if reg.returncode != 0:
                clean = plain(out).splitlines()[-1:]
                raise RuntimeError(f"registering SuperNode {i}'s key failed: {clean}")

    def _register_one(self, i: int, env: dict[str, str]) -> subprocess.Popen:
        cmd = ["flwr", "supernode", "register", str(self.creds.node_pub(i)), "local"]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True,
                                preexec_fn=_die_with_parent)  # fmt: skip

    def _cli_home(self) -> Path:
        """``flwr``'s home: a connection to this SuperLink that verifies its certificate."""
        home = self.work / "cli"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            flwr_config("local", f"127.0.0.1:{self.port}", self.creds.ca)
        )
        return home

    def env(self, home: Path) -> dict[str, str]:
        out = os.environ | {"FLWR_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        out.setdefault(POLL, "0.25")  # SuperExec asks for new tasks 4 times a second, not once
        if self.socket is not None:  # for every SuperExec: the stand-ins come first
            path = f"{self.work / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
            out |= {"PATH": path, warm.SOCKET: str(self.socket)}
        return out | {watchdog.MARK: self.token}

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        home = self.work / name
        home.mkdir(exist_ok=True)
        log = open(self.work / f"{name}.log", "w")  # noqa: SIM115  (the process keeps it)
        proc = subprocess.Popen(cmd, env=self.env(home), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
        self.procs[name] = proc
        return proc

    def submit(self, app: Path) -> subprocess.Popen:
        """``flwr run`` against this SuperLink, streaming the run's log."""
        home = self._cli_home()
        cmd = ["flwr", "run", str(app), "local", "--stream"]
        proc = subprocess.Popen(cmd, env=self.env(home), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                preexec_fn=_die_with_parent)  # fmt: skip
        self.procs["flwr-run"] = proc
        return proc

    def stop(self) -> None:
        """SIGTERM to every process of the deployment (all that hold its mark, wherever
        Flower's SuperExec started them), then SIGKILL what is left after 10 s: the ServerApp
        holds the run dir until it exits. Then the guard, its pipe closed, finds none."""
        pids = watchdog.marked(self.token)
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while (alive := [p for p in pids if _running(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        watchdog.kill_marked(self.token)
        for proc in self.procs.values():
            proc.wait()
        while any(_running(p) for p in alive) and time.monotonic() < deadline + 5:
            time.sleep(0.1)
        assert self.guard.stdin is not None
        self.guard.stdin.close()
        self.guard.wait()
        if self.socket is not None:
            shutil.rmtree(self.socket.parent, ignore_errors=True)


class Watch(threading.Thread):
    """While the run streams: end it (by stopping ``flwr run``) as soon as the ServerApp
    reports an error or the SuperLink exits, instead of waiting for Flower to notice."""

    def __init__(self, deployment: Deployment, run: subprocess.Popen, error_file: Path) -> None:
        super().__init__(daemon=True)
        self.deployment, self.run_proc, self.error_file = deployment, run, error_file
        self.problem = ""
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5) and self.run_proc.poll() is None:
            self.check_link()
            if self.problem or self.error_file.is_file():
                _signal(self.run_proc.pid, signal.SIGTERM)
                return

    def check_link(self, grace: float = 0.0) -> None:
        """Name the SuperLink's exit as the problem when it has exited (within ``grace``
        seconds: ``flwr run`` may notice a killed SuperLink before this thread does)."""
        link = self.deployment.procs["superlink"]
        with contextlib.suppress(subprocess.TimeoutExpired):
            link.wait(grace)
        if link.poll() is not None and not self.problem:
            log = self.deployment.work / "superlink.log"
            self.problem = f"the SuperLink exited with {link.returncode}: {tail(log, 2)}"


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
