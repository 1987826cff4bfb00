"""Finding dataset files on disk, with one clear error when they are absent."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedbat.errors import DataNotFoundError


def places(root: str | None, defaults: Sequence[str]) -> list[str]:
    """Where to look: ``data.root`` alone when set (never a silent fallback), else ``defaults``."""
    return [root] if root else list(defaults)


def find_root(root: str | None, defaults: Sequence[str], required: Sequence[str]) -> Path | None:
    """The first of :func:`places` holding every ``required`` file, or None.

    Use :func:`missing` to raise.
    """
    for cand in places(root, defaults):
        path = Path(cand).expanduser()
        if all((path / f).is_file() for f in required):
            return path
    return None


def missing(dataset: str, root: str | None, defaults: Sequence[str], how: str) -> DataNotFoundError:
    """The error for a dataset whose files are in none of the places we looked."""
    looked = ", ".join(places(root, defaults))
    return DataNotFoundError(f"data.name={dataset}: files not found (looked in {looked}); {how}")
