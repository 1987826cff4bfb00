"""Atomic round checkpoints that load without executing code (``weights_only=True``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint.pt"


def save(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write to a temporary file, fsync, then rename over the previous checkpoint: a crash at
    any moment leaves either the old or the new checkpoint, never a torn one."""
    path = Path(run_dir) / CHECKPOINT
    tmp = path.with_suffix(".pt.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
