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
# 1: client states inside the checkpoint, every client sent the full model after a resume;
# 2: the client store's index and the downlink's versions; 3: this key, the same content
FORMAT = 3


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
    version = format_of(state)
    if not isinstance(version, int) or not 1 <= version <= FORMAT:
        raise CheckpointError(
            f"resume={str(path)!r}: checkpoint format {version!r}; this fedbat reads formats "
            f"1 to {FORMAT} (a newer fedbat wrote it?)"
        )
    return state


def format_of(state: dict[str, Any]) -> Any:
    """A checkpoint's format; those before the key: 2 with a client store, else 1."""
    return state.get("format", 2 if "clients" in state else 1)


def migrate(
    state: dict[str, Any], num_clients: int
) -> tuple[dict[str, Any], dict[int, dict[str, torch.Tensor]]]:
    """A loaded checkpoint in the current :data:`FORMAT`, and the per-client states an older
    format held inside it (for the client store, by client, keyed as the store keeps them).

    >>> old = {"round": 2, "uplink_memory": {"1/w": torch.ones(1)}, "client_states": {}}
    >>> new, legacy = migrate(old, num_clients=3)
    >>> new["format"], new["downlink"]["version"].tolist(), legacy
    (3, [-1, -1, -1], {1: {'residual/w': tensor([1.])}})
    """
    state, legacy = dict(state), {}
    if format_of(state) == 1:
        for part, key in (("residual", "uplink_memory"), ("state", "client_states")):
            for name, v in state.pop(key, {}).items():
                client, _, tensor = name.partition("/")
                legacy.setdefault(int(client), {})[f"{part}/{tensor}"] = v
        state["clients"] = {"index": torch.full((num_clients,), -1, dtype=torch.int32)}
    none_sent = torch.full((num_clients,), -1, dtype=torch.int32)  # all: the full model
    state.setdefault("downlink", {"version": none_sent, "recent": {}, "recent_payload_bits": {}})
    state.setdefault("schedule", {})
    state.setdefault("monitor", "auto")
    state["format"] = FORMAT
    return state, legacy
