"""A dataset kept as tensor files in a folder: the format of a node's own data.

``<root>/train.safetensors`` and ``<root>/test.safetensors`` each hold ``x`` (float32,
N x C x H x W, already normalised) and ``y`` (int64 labels in [0, num_classes)), with
``num_classes`` (and ``augment``, "true" for a random crop and flip in local training) in the
file's metadata. Either file may be absent: a federated node holds
only its training data, a server only its evaluation data. Safetensors holds no code, so
reading a file someone else wrote runs nothing of theirs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fedbat.datamodules.datasets import Splits, register
from fedbat.errors import ConfigError, DataNotFoundError

SPLITS = ("train", "test")


def write_split(
    root: str | Path,
    split: str,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    augment: bool = False,
) -> Path:
    """Write one split of a ``tensors`` dataset (``data.name=tensors``) under ``root``."""
    path = Path(root) / f"{split}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"x": x.float().contiguous(), "y": y.long().contiguous()}
    save_file(
        tensors,
        str(path),
        metadata={"num_classes": str(num_classes), "augment": str(augment).lower()},
    )
    return path


@register("tensors")
def load_tensors(root: str | None = None, **_: object) -> Splits:
    """The splits found in ``root``; at least one must be there."""
    if not root:
        raise ConfigError("data.name=tensors: data.root must name the folder of its files")
    found = {s: read(Path(root) / f"{s}.safetensors") for s in SPLITS}
    present = [v for v in found.values() if v is not None]
    if not present:
        names = " or ".join(f"{s}.safetensors" for s in SPLITS)
        raise DataNotFoundError(f"data.root={root}: holds neither {names}")
    if len({(x.shape[1:], meta["num_classes"]) for x, _, meta in present}) > 1:
        raise ConfigError(f"data.root={root}: train and test differ in image shape or num_classes")
    x, _, meta = present[0]
    empty = (torch.zeros(0, *x.shape[1:]), torch.zeros(0, dtype=torch.int64), meta)
    (x_tr, y_tr, train), (x_te, y_te, _) = (found[s] or empty for s in SPLITS)
    num_classes, augment = int(meta["num_classes"]), train.get("augment") == "true"
    return Splits(x_tr, y_tr, x_te, y_te, num_classes=num_classes, augment=augment)


def read(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]] | None:
    """``path``'s images, labels and metadata, checked; None when there is no file."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(f"data.root: {path} is not a readable safetensors file ({err})") from None
    x, y = tensors.get("x"), tensors.get("y")
    if problem := check(x, y, meta.get("num_classes", "")):
        raise ConfigError(f"data.root: {path}: {problem}")
    assert x is not None and y is not None
    return x, y, meta


def check(x: torch.Tensor | None, y: torch.Tensor | None, num_classes: str) -> str:
    """What is wrong with a split's tensors ('' when nothing)."""
    if x is None or y is None:
        return "must hold tensors 'x' and 'y'"
    if not num_classes.isdigit() or not 1 <= int(num_classes) <= 100_000:
        return f"metadata num_classes={num_classes!r}: must be an integer in [1, 100000]"
    if x.dtype != torch.float32 or x.dim() != 4:
        return f"x: {x.dtype} of shape {tuple(x.shape)}; must be float32 of N x C x H x W"
    if y.dtype != torch.int64 or y.shape != (x.shape[0],):
        return f"y: {y.dtype} of shape {tuple(y.shape)}; must be int64 of ({x.shape[0]},)"
    if not torch.isfinite(x).all():
        return "x holds NaN or infinite values"
    if len(y) and not (int(y.min()) >= 0 and int(y.max()) < int(num_classes)):
        return f"labels must be in [0, {num_classes})"
    return ""
