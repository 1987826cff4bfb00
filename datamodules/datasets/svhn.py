"""SVHN from its standard ``train_32x32.mat`` / ``test_32x32.mat`` files."""

from __future__ import annotations

import numpy as np
import torch

from fedbat.datamodules.datasets import Splits, normalise, register
from fedbat.datamodules.datasets.files import find_root, missing

FILES = ("train_32x32.mat", "test_32x32.mat")
DEFAULT_ROOTS = ("./data/svhn", "./data")
HOW = (
    "download train_32x32.mat and test_32x32.mat into data.root "
    "(or install torchvision and set data.download=true)"
)
MEAN, STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)


@register("svhn")
def load_svhn(root: str | None = None, download: bool = False, **_: object) -> Splits:
    base = find_root(root, DEFAULT_ROOTS, FILES)
    if base is None and download:
        try:
            import torchvision.datasets as tvd

            for split in ("train", "test"):
                tvd.SVHN(root or DEFAULT_ROOTS[0], split=split, download=True)
            base = find_root(root, DEFAULT_ROOTS, FILES)
        except ImportError:
            pass
    if base is None:
        raise missing("svhn", root, DEFAULT_ROOTS, HOW)
    from scipy.io import loadmat

    out = []
    for f in FILES:
        mat = loadmat(base / f)
        x = torch.from_numpy(np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1)))
        y = torch.from_numpy(mat["y"].astype(np.int64).ravel() % 10)  # label 10 means digit 0
        out += [normalise(x, list(MEAN), list(STD)), y]
    return Splits(*out, num_classes=10)
