"""The guard of a local deployment: no Flower process outlives ``fedbat flower``.

``fedbat flower`` starts this first, in a session of its own, with a pipe on its stdin and a
token; every process of the deployment (the SuperLink, the SuperNodes, ``flwr run``, and
what they start: SuperExec, the ServerApp, the ClientApps) inherits ``FEDBAT_DEPLOYMENT=<token>``
in its environment. When the pipe closes, because the launcher stopped or was killed
(SIGKILL included), the guard kills every process whose environment holds the token. It
imports nothing heavy, so that it is running before anything else starts.

Run as ``python -m fedbat.integrations.flower.watchdog TOKEN``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

MARK = "FEDBAT_DEPLOYMENT"


def marked(token: str, mark: str = MARK) -> list[int]:
    """The processes whose environment holds ``<mark>=<token>`` (Linux /proc)."""
    needle = f"{mark}={token}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    out.append(int(entry))
        except OSError:
            continue  # gone, or not ours
    return out


def kill_marked(token: str, sig: int = signal.SIGKILL, rounds: int = 5) -> None:
    """Signal every marked process; again, for what they started meanwhile."""
    for _ in range(rounds):
        pids = marked(token)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        time.sleep(0.2)


def main(token: str) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    while sys.stdin.buffer.read(65536):
        pass
    kill_marked(token)


if __name__ == "__main__":
    main(sys.argv[1])
