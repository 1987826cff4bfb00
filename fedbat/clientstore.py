"""Per-client state (error-feedback residuals, a strategy's client state such as SCAFFOLD's
``c_i``) on disk, so that a process's memory does not grow with the population.

Each client's state after the round it last trained in is one safetensors file,
``<run_dir>/clients/<client>.<round>.safetensors``, written by the process that trained it;
only the round's clients are ever in memory. An index (per client, the round of its
current file; -1: none) advances identically on every process and is saved in the
checkpoint: a resumed run reads the files that index names, so files written after the
last checkpoint by a run that was killed are never read (they are overwritten when the
round is played again). Superseded files are deleted once a checkpoint no longer needs them.

A client's file is input like a packet: read without following a symbolic link, bounded in
size, and checked against the state this run's clients keep (names, shapes, dtypes, finite
values). A file that fails (missing, truncated, garbage, another run's, a link) costs that
client its state, never the run: it is moved to ``clients/damaged/`` and the client starts
over, which :attr:`ClientStore.resets` records.

>>> import tempfile, torch
>>> store = ClientStore(tempfile.mkdtemp(), num_clients=3)
>>> store.put(1, 0, {"residual/w": torch.ones(2)})
>>> store.advance([1], 0)
>>> store.get(1), store.get(2)
({'residual/w': tensor([1., 1.])}, {})
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from fedbat.compressors.base import all_finite
from fedbat.errors import RunDirError

DIR, DAMAGED = "clients", "damaged"
Template = Mapping[str, tuple[torch.Size, torch.dtype]]  # what a client's state may hold
HEADER_SLACK = 4096  # a safetensors header: a JSON entry of at most this per tensor, and more


class ClientStore:
    """The client store of one run dir. ``template`` names every tensor a client's state may
    hold, with its shape and dtype (None: anything finite, for inspection)."""

    def __init__(
        self, run_dir: str | Path, num_clients: int, template: Template | None = None
    ) -> None:
        self.dir = Path(run_dir) / DIR
        self.index = torch.full((num_clients,), -1, dtype=torch.int32)
        self.committed = self.index.clone()  # as of the last checkpoint
        self.template = template
        self.resets: dict[int, str] = {}  # client -> why its state was dropped, until taken

    def path(self, client: int, round_idx: int) -> Path:
        return self.dir / f"{client}.{round_idx}.safetensors"

    def get(self, client: int) -> dict[str, torch.Tensor]:
        """The client's state as of the last round it trained in ({} before its first, or
        when its file is damaged: the file is then moved aside and the reason recorded)."""
        r = int(self.index[client])
        if r < 0:
            return {}
        path = self.path(client, r)
        try:
            return self._read(path)
        except ValueError as err:
            self.resets[client] = f"{path.name}: {err}{self._set_aside(path)}"
            self.index[client] = -1
            return {}

    def _read(self, path: Path) -> dict[str, torch.Tensor]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise ValueError("missing") from None
        except OSError as err:  # ELOOP: a symbolic link, never followed
            why = "a symbolic link, not followed" if os.path.islink(path) else err.strerror
            raise ValueError(why) from None
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ValueError("not a regular file")
            limit = self._max_bytes()
            if info.st_size > limit:
                raise ValueError(f"{info.st_size} bytes, more than the {limit} a state can take")
            data = f.read()
        try:
            tensors = load(data)
        except (SafetensorError, ValueError, RuntimeError) as err:
            raise ValueError(f"unreadable ({' '.join(str(err).split())[:120]})") from None
        for name in sorted(tensors):  # the same file is always reported the same way
            self._check(name, tensors[name])
        return tensors

    def _check(self, name: str, t: torch.Tensor) -> None:
        if self.template is not None:
            if name not in self.template:
                raise ValueError(f"holds {name!r}, which no client of this run keeps")
            shape, dtype = self.template[name]
            if t.shape != shape or t.dtype != dtype:
                raise ValueError(
                    f"{name}: {tuple(t.shape)} {t.dtype}, this run keeps {tuple(shape)} {dtype}"
                )
        if t.is_floating_point() and not all_finite(t):
            raise ValueError(f"{name}: non-finite values")

    def _max_bytes(self) -> int:
        if self.template is None:
            return 2**40
        data = sum(s.numel() * d.itemsize for s, d in self.template.values())
        return data + HEADER_SLACK * (len(self.template) + 1)

    def _set_aside(self, path: Path) -> str:
        """Move a damaged file (or link, itself) to ``clients/damaged/``, never deleting it."""
        if not os.path.lexists(path):
            return ""
        aside = self.dir / DAMAGED
        try:
            aside.mkdir(exist_ok=True)
            target, n = aside / path.name, 1
            while os.path.lexists(target):
                target, n = aside / f"{path.name}.{n}", n + 1
            os.rename(path, target)
        except OSError as err:
            return f"; left in place ({err.strerror})"
        return f"; kept as {DIR}/{DAMAGED}/{target.name}"

    def take_resets(self) -> dict[int, str]:
        """The resets since the last call (the round's, for its result messages)."""
        out, self.resets = self.resets, {}
        return out

    def put(self, client: int, round_idx: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write the client's state after ``round_idx`` (atomically: a reader sees the old
        file or the new one; never through a symbolic link). Called by the process that
        trained it; a failed write (disk full, the folder gone) is a RunDirError."""
        final = self.path(client, round_idx)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        try:
            data = save({k: v.contiguous() for k, v in tensors.items()})
            self.dir.mkdir(exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        except OSError as err:
            _remove(tmp)
            raise RunDirError(
                f"run_dir={self.dir.parent}: cannot write {DIR}/{final.name} ({err.strerror}); "
                "its last checkpoint is kept"
            ) from None

    def advance(self, clients: list[int], round_idx: int) -> None:
        """``clients`` wrote their state in ``round_idx``: every process records it."""
        if clients:
            self.index[clients] = round_idx

    def forget(self, clients: list[int]) -> None:
        """``clients`` lost their state (a damaged file): every process records it."""
        if clients:
            self.index[clients] = -1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"index": self.index.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """The index of a checkpoint; a file it names that is gone costs that client its
        state when it is next sampled, as a damaged one does."""
        index = state["index"]
        if index.shape != self.index.shape:
            raise ValueError(f"client state index for {index.numel()} clients")
        self.index = index.to(torch.int32).clone()
        self.committed = self.index.clone()

    def collect(self) -> None:
        """After a checkpoint (rank 0): delete the files it no longer needs, those of the
        clients that wrote a newer one since the previous checkpoint."""
        for c in torch.nonzero(self.index != self.committed).flatten().tolist():
            current = int(self.index[c])
            for old in self.dir.glob(f"{c}.*.safetensors"):
                r = old.name.split(".")[1]
                if r.isdigit() and int(r) < current:
                    old.unlink(missing_ok=True)
        self.committed = self.index.clone()

    def load_all(self) -> dict[str, torch.Tensor]:
        """Every client's current state, keyed ``"<client>/<name>"``: for inspection and
        tests; a run never holds this."""
        out = {}
        for c in torch.nonzero(self.index >= 0).flatten().tolist():
            out |= {f"{c}/{k}": v for k, v in self.get(c).items()}
        return out


def remove_stale(run_dir: Path) -> list[Path]:
    """Delete the half-written ``.<file>.<pid>.tmp`` files of a run that was killed (only
    while holding the run dir's lock)."""
    folder = run_dir / DIR
    if not folder.is_dir() or folder.is_symlink():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and p.suffix == ".tmp"]
    for p in stale:
        _remove(p)
    return stale


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):  # never there, or the folder is gone
        path.unlink()


def read(run_dir: str | Path, checkpoint: dict) -> dict[str, torch.Tensor]:
    """Every client's state as of ``checkpoint`` (a loaded checkpoint of ``run_dir``), keyed
    ``"<client>/residual/<tensor>"`` and ``"<client>/state/<name>"``."""
    index = checkpoint["clients"]["index"]
    store = ClientStore(run_dir, index.numel())
    store.load_state_dict(checkpoint["clients"])
    return store.load_all()
