"""Fashion-MNIST from the four idx .gz files (Debian: ``apt-get install dataset-fashion-mnist``)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from fedbat.datamodules.datasets import Splits, normalise, register
from fedbat.datamodules.datasets.files import find_root, missing
from fedbat.errors import ConfigError

FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
DEFAULT_ROOTS = ("./data/fashion-mnist", "/usr/share/datasets/fashion-mnist")
HOW = "install them with `apt-get install dataset-fashion-mnist` or set data.root to their folder"
MEAN, STD = 0.2860, 0.3530  # the training split's statistics
TEST_MEAN, TEST_STD = 0.2868, 0.3524  # the test split's, which the FedBAT authors use for it
NORMALISATIONS = ("train", "per_split")


def read_idx(path: Path) -> np.ndarray:
    """Parse one idx file (gzip-compressed): big-endian dims header, then uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(tuple(dims))


@register("fmnist")
def load_fmnist(root: str | None = None, normalize: str = "train", **_: object) -> Splits:
    """``normalize``: ``train`` (both splits with the training statistics) or ``per_split``
    (each split with its own, as the FedBAT authors' code does)."""
    if normalize not in NORMALISATIONS:
        raise ConfigError(
            f"data.normalize={normalize!r}: must be one of {', '.join(NORMALISATIONS)}"
        )
    base = find_root(root, DEFAULT_ROOTS, list(FILES.values()))
    if base is None:
        raise missing("fmnist", root, DEFAULT_ROOTS, HOW)
    arrays = {k: torch.from_numpy(read_idx(base / f).copy()) for k, f in FILES.items()}
    return Splits(
        x_train=normalise(arrays["x_train"].unsqueeze(1), MEAN, STD),
        y_train=arrays["y_train"].long(),
        x_test=normalise(
            arrays["x_test"].unsqueeze(1),
            *((TEST_MEAN, TEST_STD) if normalize == "per_split" else (MEAN, STD)),
        ),
        y_test=arrays["y_test"].long(),
        num_classes=10,
    )
