"""CIFAR-10/100 from their binary-version files, or through torchvision when installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedbat.datamodules.datasets import Splits, normalise, register
from fedbat.datamodules.datasets.files import find_root, missing

# (folder, train files, test file, label bytes per record (the fine label is the last),
#  mean, std, classes)
LAYOUTS = {
    "cifar10": (
        "cifar-10-batches-bin",
        [f"data_batch_{i}.bin" for i in range(1, 6)],
        "test_batch.bin",
        1,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        10,
    ),
    "cifar100": (
        "cifar-100-binary",
        ["train.bin"],
        "test.bin",
        2,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        100,
    ),
}


def _read_bin(paths: list[Path], label_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Records are ``label_bytes`` label bytes (the last one is the fine label) + 3072 pixels."""
    rec = label_bytes + 3072
    raw = np.concatenate([np.fromfile(p, dtype=np.uint8) for p in paths]).reshape(-1, rec)
    x = torch.from_numpy(raw[:, label_bytes:].reshape(-1, 3, 32, 32).copy())
    y = torch.from_numpy(raw[:, label_bytes - 1].astype(np.int64))
    return x, y


def _via_torchvision(name: str, root: str, download: bool) -> tuple[torch.Tensor, ...] | None:
    try:
        import torchvision.datasets as tvd  # optional dependency
    except Exception:
        return None
    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    out: list[torch.Tensor] = []
    for train in (True, False):
        ds = cls(root, train=train, download=download)
        out += [
            torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
            torch.tensor(ds.targets),
        ]
    return tuple(out)


def _load(name: str, root: str | None, download: bool) -> Splits:
    folder, train_files, test_file, label_bytes, mean, std, classes = LAYOUTS[name]
    roots = ("./data",)
    how = (
        f"put the binary version ({folder}/) under data.root, "
        "or `pip install torchvision` and set data.download=true"
    )
    base = find_root(root, roots, [f"{folder}/{f}" for f in [*train_files, test_file]])
    if base is not None:
        x_tr, y_tr = _read_bin([base / folder / f for f in train_files], label_bytes)
        x_te, y_te = _read_bin([base / folder / test_file], label_bytes)
    else:
        got = _via_torchvision(name, root or roots[0], download)
        if got is None:
            raise missing(name, root, roots, how)
        x_tr, y_tr, x_te, y_te = got
    return Splits(
        normalise(x_tr, list(mean), list(std)),
        y_tr.long(),
        normalise(x_te, list(mean), list(std)),
        y_te.long(),
        num_classes=classes,
        augment=True,
    )


@register("cifar10")
def load_cifar10(root: str | None = None, download: bool = False, **_: object) -> Splits:
    return _load("cifar10", root, download)


@register("cifar100")
def load_cifar100(root: str | None = None, download: bool = False, **_: object) -> Splits:
    return _load("cifar100", root, download)
