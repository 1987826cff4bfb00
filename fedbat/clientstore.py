"""Per-client state (error-feedback residuals, a strategy's client state such as SCAFFOLD's
``c_i``) on disk, so that a process's memory does not grow with the population.

Each client's state after the round it last trained in is one safetensors file,
``<run_dir>/clients/<client>.<round>.safetensors``, written by the process that trained it;
only the round's clients are ever in memory. An index (per client, the round of its
current file; -1: none) advances identically on every process and is saved in the
checkpoint: a resumed run reads the files that index names, so files written after the
last checkpoint by a run that was killed are never read (they are overwritten when the
round is played again). Superseded files are deleted once a checkpoint no longer needs them.

>>> import tempfile, torch
>>> store = ClientStore(tempfile.mkdtemp(), num_clients=3)
>>> store.put(1, 0, {"residual/w": torch.ones(2)})
>>> store.advance([1], 0)
>>> store.get(1), store.get(2)
({'residual/w': tensor([1., 1.])}, {})
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class ClientStore:
    def __init__(self, run_dir: str | Path, num_clients: int) -> None:
        self.dir = Path(run_dir) / "clients"
        self.index = torch.full((num_clients,), -1, dtype=torch.int32)
        self.committed = self.index.clone()  # as of the last checkpoint

    def path(self, client: int, round_idx: int) -> Path:
        return self.dir / f"{client}.{round_idx}.safetensors"

    def get(self, client: int) -> dict[str, torch.Tensor]:
        """The client's state as of the last round it trained in ({} before its first)."""
        r = int(self.index[client])
        return load_file(self.path(client, r)) if r >= 0 else {}

    def put(self, client: int, round_idx: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write the client's state after ``round_idx`` (atomically: a reader sees the old
        file or the new one). Called by the process that trained it."""
        self.dir.mkdir(exist_ok=True)
        final = self.path(client, round_idx)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, final)

    def advance(self, clients: list[int], round_idx: int) -> None:
        """``clients`` wrote their state in ``round_idx``: every process records it."""
        if clients:
            self.index[clients] = round_idx

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"index": self.index.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        index = state["index"]
        if index.shape != self.index.shape:
            raise ValueError(f"client state index for {index.numel()} clients")
        held = torch.nonzero(index >= 0).flatten().tolist()
        missing = [p for c in held if not (p := self.path(c, int(index[c]))).is_file()]
        if missing:
            raise ValueError(f"{len(missing)} client state file(s) missing, e.g. {missing[0]}")
        self.index = index.to(torch.int32).clone()
        self.committed = self.index.clone()

    def collect(self) -> None:
        """After a checkpoint (rank 0): delete the files it no longer needs, those of the
        clients that wrote a newer one since the previous checkpoint."""
        for c in torch.nonzero(self.index != self.committed).flatten().tolist():
            keep = self.path(c, int(self.index[c])).name
            for old in self.dir.glob(f"{c}.*.safetensors"):
                if old.name != keep and int(old.name.split(".")[1]) < int(self.index[c]):
                    old.unlink(missing_ok=True)
        self.committed = self.index.clone()

    def load_all(self) -> dict[str, torch.Tensor]:
        """Every client's current state, keyed ``"<client>/<name>"``: for inspection and
        tests; a run never holds this."""
        out = {}
        for c in torch.nonzero(self.index >= 0).flatten().tolist():
            out |= {f"{c}/{k}": v for k, v in self.get(c).items()}
        return out


def read(run_dir: str | Path, checkpoint: dict) -> dict[str, torch.Tensor]:
    """Every client's state as of ``checkpoint`` (a loaded checkpoint of ``run_dir``), keyed
    ``"<client>/residual/<tensor>"`` and ``"<client>/state/<name>"``."""
    index = checkpoint["clients"]["index"]
    store = ClientStore(run_dir, index.numel())
    store.load_state_dict(checkpoint["clients"])
    return store.load_all()
