"""Warm apps: a fork server that imports Flower's app runtimes, torch, Lightning and fedbat
once, and ``flwr-clientapp`` and ``flwr-serverapp`` stand-ins that ask it for each task.

A SuperNode (its SuperExec) starts one ``flwr-clientapp`` process per message it receives,
and each imports the whole stack anew (about 4 s here) before it trains; the SuperLink's
starts a ``flwr-serverapp`` per run, as costly. With the stand-ins first on their ``PATH``
and ``FEDBAT_WARM_SOCKET`` naming the server's socket, each of those processes is instead
a fork of the server: the same command line,
environment, working folder and standard streams, and the stand-in exits with the fork's
exit code. A fork is a fresh process in all but its imports: nothing of one task reaches
the next (fedbat's own caches are built in the fork and end with it). When no server
answers, the stand-in runs Flower's own command, so a node without the server still works.

Start a server for the SuperNodes of one machine with
``python -m fedbat.integrations.flower.warm SOCKET BIN``: it writes the stand-ins to
``BIN/flwr-clientapp`` and ``BIN/flwr-serverapp`` and serves until it is stopped, on a
socket in a folder of its user's alone (created 0700; one others may use is refused), and
forks only for that user.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import shutil
import socket
import struct
import sys
import traceback
from pathlib import Path

SOCKET = "FEDBAT_WARM_SOCKET"
APPS = {  # what the server forks: Flower's own entry points
    "flwr-clientapp": ("flwr.supernode.cli.flwr_clientapp", "flwr_clientapp"),
    "flwr-serverapp": ("flwr.superlink.cli.flwr_serverapp", "flwr_serverapp"),
}

STAND_IN = """#!{python} -S
# fedbat's {name}: a fork of the warm server (fedbat/integrations/flower/warm.py)
import json, os, socket, sys
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(os.environ["{socket}"])
except (OSError, KeyError):  # no server: Flower's own command
    os.execv({real!r}, [{real!r}, *sys.argv[1:]])
ask = {{"argv": ["{name}", *sys.argv[1:]], "env": dict(os.environ), "cwd": os.getcwd()}}
socket.send_fds(s, [json.dumps(ask).encode()], [0, 1, 2])
code = s.recv(16)
sys.exit(int(code) if code else 1)
"""


def write_stand_ins(folder: Path) -> None:
    """``folder/flwr-clientapp`` and ``folder/flwr-serverapp``, the stand-ins, for the front
    of a SuperNode's or SuperLink's ``PATH``."""
    elsewhere = [p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != folder]
    folder.mkdir(parents=True, exist_ok=True)
    for name in APPS:
        real = shutil.which(name, path=os.pathsep.join(elsewhere))
        if real is None:
            raise RuntimeError(f"{name} not found: Flower is not installed")
        text = STAND_IN.format(python=sys.executable, socket=SOCKET, real=real, name=name)
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)


def serve(path: Path) -> None:
    """Fork an app for each request on the Unix socket ``path``, until killed. One thread
    only, so that a fork inherits no lock another thread holds."""
    import fedbat.integrations.flower.client_app  # torch, Lightning, fedbat
    import fedbat.integrations.flower.server_app  # noqa: F401

    for module, _ in APPS.values():
        importlib.import_module(module)

    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    path.unlink(missing_ok=True)
    server.bind(str(path))
    server.listen(64)
    waiting: dict[int, socket.socket] = {}  # a fork's pid -> its stand-in
    while True:
        if select.select([server], [], [], 0.05)[0]:
            conn, _ = server.accept()
            try:
                pid, name = fork(conn, server)
            except (OSError, ValueError) as err:
                print(f"fedbat: warm: refused a request: {err}", flush=True)
                conn.close()  # its stand-in exits 1
                continue
            waiting[pid] = conn
            print(f"fedbat: warm: forked {name} (pid {pid})", flush=True)
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = waiting.pop(pid)
            with contextlib.suppress(OSError):  # its stand-in may be gone
                conn.send(str(os.waitstatus_to_exitcode(status) % 256).encode())
            conn.close()


def fork(conn: socket.socket, server: socket.socket) -> tuple[int, str]:
    """A child that runs the app the stand-in named, as it asked, on its streams."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    if struct.unpack("3i", creds)[1] != os.getuid():
        raise ValueError("a request from another user")
    msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError("a request carries the three standard streams")
    try:
        ask = json.loads(msg)
        argv = ask.get("argv") if isinstance(ask, dict) else None
        name = argv[0] if isinstance(argv, list) and argv and isinstance(argv[0], str) else ""
        if name not in APPS:  # the stand-ins name one of them first
            raise ValueError(f"asked for {name!r}, not one of {sorted(APPS)}")
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        return pid, name
    code = 1
    try:
        server.close()
        conn.close()
        for fd, std in zip(fds, (0, 1, 2), strict=True):
            os.dup2(fd, std)
            os.close(fd)
        os.chdir(ask["cwd"])
        os.environ.clear()
        os.environ.update(ask["env"])
        sys.argv = list(ask["argv"])
        module, entry = APPS[name]
        getattr(importlib.import_module(module), entry)()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def private(path: Path) -> str:
    """What is wrong with serving on ``path`` ('' when nothing): its folder must be its
    user's alone, since whoever can connect has a ClientApp run as this user."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.parent.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        return f"{path.parent}: others may use it (mode {info.st_mode & 0o777:o}); chmod 700 it"
    return ""


if __name__ == "__main__":
    problem = "usage: python -m fedbat.integrations.flower.warm SOCKET BIN"
    if len(sys.argv) != 3 or (problem := private(Path(sys.argv[1]))):
        print(f"fedbat: error: {problem}", file=sys.stderr)
        sys.exit(2)
    write_stand_ins(Path(sys.argv[2]))
    serve(Path(sys.argv[1]))
