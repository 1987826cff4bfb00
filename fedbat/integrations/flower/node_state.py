"""What a Flower node keeps between rounds: the weights it holds and its own state (residuals,
the strategy's client state), one safetensors blob (``protocol.pack_state``) per round.

Without a ``state-dir`` in its node config the blob lives in the node's Flower context, which
lasts one Flower run: a resumed deployment starts its clients bare. With one, the node writes
each round's blob to its own disk (``<state-dir>/client-<id>/<round>.safetensors``, through a
temporary file and a rename, so a kill leaves the previous blob whole), and a restarted node
or a resumed deployment picks up where the server's checkpoint stands.

Which blob a round uses: the newest of a round before it. A deployment killed mid-round
resumes from the server's last checkpoint and plays that round again; a blob the killed
round wrote is then newer than the round being played, and is passed over. Two blobs are
kept, enough when the server checkpoints every round (``checkpoint.every=1``, the default).
``fedbat flower`` puts its SuperNodes' state-dirs in the run dir (:func:`node_states`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from omegaconf import DictConfig
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from fedbat.checkpoint import CHECKPOINT

NODES = "nodes"  # in the run dir: the SuperNodes' state-dirs


def node_states(cfg: DictConfig) -> tuple[Path, bool]:
    """The folder of the SuperNodes' state-dirs, and whether the run resumes from this run
    dir's own checkpoint: the nodes' states then continue that run; any other start empties
    the folder, so that no client picks up the state of an earlier run."""
    run_dir = Path(cfg.run_dir)
    own = run_dir / CHECKPOINT
    resume = cfg.resume
    resumes = own.is_file() and (
        resume == "auto"
        or (resume not in (False, "false", "never", None) and Path(str(resume)).resolve() == own)
    )
    root = run_dir / NODES
    if not resumes:
        shutil.rmtree(root, ignore_errors=True)
    return root, resumes


KEEP = 2  # blobs kept per client: the one in use, and the one a killed round may have written
SUFFIX = ".safetensors"


class DiskState:
    """The blobs of one client in ``root`` (its node's ``state-dir``)."""

    def __init__(self, root: str | Path, client: int) -> None:
        self.dir = Path(root) / f"client-{client}"

    def load(self, before: int) -> tuple[bytes, int]:
        """The blob of the newest round before ``before`` and that round (b"", -1: none). A
        blob that does not parse (a damaged disk) is deleted and the one before it is used:
        it costs this client its state, never every later round."""
        for r in sorted((r for r in self._rounds() if r < before), reverse=True):
            path = self.dir / f"{r}{SUFFIX}"
            blob = path.read_bytes()
            try:
                st_load(blob)
            except (SafetensorError, ValueError):
                path.unlink()
                continue
            return blob, r
        return b"", -1

    def save(self, blob: bytes, round_idx: int) -> None:
        """Write round ``round_idx``'s blob atomically (and to the disk, not only to its
        cache); keep the newest ``KEEP``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"{round_idx}{SUFFIX}"
        tmp = final.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        for r in sorted(self._rounds())[:-KEEP]:
            (self.dir / f"{r}{SUFFIX}").unlink(missing_ok=True)

    def _rounds(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        names = (p.name.removesuffix(SUFFIX) for p in self.dir.glob(f"*{SUFFIX}"))
        return [int(n) for n in names if n.isdigit()]
