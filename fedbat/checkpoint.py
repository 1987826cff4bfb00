"""Atomic round checkpoints that load without executing code (``weights_only=True``)."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Any

import torch

from fedbat.errors import CheckpointError

CHECKPOINT = "checkpoint.pt"


def save(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write to a temporary file, fsync, then rename over the previous checkpoint: a crash at
    any moment leaves either the old or the new checkpoint, never a torn one."""
    path = Path(run_dir) / CHECKPOINT
    tmp = path.with_suffix(".pt.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch reports a failed write (ENOSPC) as either
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError):
            raise
        reason = (str(err).strip().splitlines() or ["write failed"])[0][:160]
        raise OSError(errno.EIO, reason, str(path)) from None
    return path


KEYS = ("round", "server", "bits", "history", "wandb_id", "config")


def load(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path``; a file that is not a complete fedbat checkpoint (truncated,
    garbage, another program's) is a one-line CheckpointError, never a traceback."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a damaged file
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0][:160]
        raise CheckpointError(
            f"resume={str(path)!r}: not a readable checkpoint ({reason}); "
            "use resume=false to start over, or another run_dir"
        ) from None
    missing = [k for k in KEYS if not isinstance(state, dict) or k not in state]
    if missing or not isinstance(state["config"], str) or not isinstance(state["round"], int):
        raise CheckpointError(
            f"resume={str(path)!r}: not a fedbat checkpoint (missing {missing or 'types'}); "
            "use resume=false to start over, or another run_dir"
        )
    return state
