"""The run directory: created and checked before anything is written, and locked so that
two runs never write into one directory (their rounds would interleave in metrics.csv and
race on the checkpoint).

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as d, RunDirLock(d):
...     RunDirLock(d).acquire()
Traceback (most recent call last):
...
fedbat.errors.RunDirError: run_dir=...: in use by process ... since ...; wait for it ...
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from fedbat.errors import RunDirError

LOCK = ".lock"
# what a run writes into its dir, named once (the checkpoint: ``checkpoint.CHECKPOINT``; the
# client store: ``clientstore.DIR``)
CONFIG, METRICS, SUMMARY = "config.yaml", "metrics.csv", "summary.json"
STALE_SUFFIXES = (".tmp",)  # half-written files of a run that was killed


def prepare(run_dir: Path) -> None:
    """Create ``run_dir`` if needed; fail in one line when it cannot hold a run."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirError(f"run_dir={run_dir}: exists and is not a directory") from None
    except OSError as err:
        raise RunDirError(f"run_dir={run_dir}: cannot be created ({err.strerror})") from None
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"run_dir={run_dir}: not writable ({err.strerror})") from None


def remove_stale(run_dir: Path) -> list[Path]:
    """Delete temporary files a killed run left behind (only while holding the lock)."""
    stale = [p for p in run_dir.iterdir() if p.is_file() and p.suffix in STALE_SUFFIXES]
    for p in stale:
        p.unlink()
    return stale


class RunDirLock:
    """An exclusive ``flock`` on ``run_dir/.lock`` for the life of a run; the file names its
    holder. The lock dies with its process, so a killed run never leaves it held."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def acquire(self) -> RunDirLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another run"
                os.close(fd)
                raise RunDirError(
                    f"run_dir={self.path.parent}: in use by {holder}; wait for it to finish "
                    "or use another run_dir"
                ) from None
            # the holder before us may have unlinked the file after we opened it: retry
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"process {os.getpid()} on {socket.gethostname()} since {started}".encode(), 0
        )
        self.fd = fd
        return self

    def holder(self) -> int | None:
        """The process holding the lock (None: free), for a run whose launcher holds it."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            words = os.pread(fd, 512, 0).decode(errors="replace").split()
            return int(words[1]) if len(words) > 1 and words[1].isdigit() else -1
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:  # unlinked while still held (no one can hold the old file), if it is still ours
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()
        except OSError:
            pass  # the run dir itself is gone: nothing to clean
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(
        self, kind: type | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
