"""Finding dataset files on disk, with one clear error when they are absent."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedbat.errors import DataNotFoundError


def find_root(root: str | None, defaults: Sequence[str], required: Sequence[str]) -> Path | None:
    """The first candidate folder holding every ``required`` file, or None.

    ``root`` (``data.root``) is tried first, then ``defaults``. Use :func:`missing` to raise.
    """
    candidates = ([root] if root else []) + list(defaults)
    for cand in candidates:
        path = Path(cand).expanduser()
        if all((path / f).is_file() for f in required):
            return path
    return None


def missing(dataset: str, root: str | None, defaults: Sequence[str], how: str) -> DataNotFoundError:
    """The error for a dataset whose files are in none of the places we looked."""
    looked = ", ".join(([root] if root else []) + list(defaults))
    return DataNotFoundError(f"data.name={dataset}: files not found (looked in {looked}); {how}")
