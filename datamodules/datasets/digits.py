"""scikit-learn's handwritten digits (1,797 real 8x8 images): the embedded offline dataset."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from fedbat.datamodules.datasets import Splits, register


@register("digits")
def load_digits_splits(test_fraction: float = 0.2, **_: object) -> Splits:
    """A fixed stratified split (seed 0), standardised with the training mean/std."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=0, stratify=y
    )
    x_train = torch.tensor(x_tr, dtype=torch.float32).reshape(-1, 1, 8, 8)
    x_test = torch.tensor(x_te, dtype=torch.float32).reshape(-1, 1, 8, 8)
    mean, std = x_train.mean(), x_train.std()
    return Splits(
        x_train=(x_train - mean) / std,
        y_train=torch.tensor(y_tr, dtype=torch.int64),
        x_test=(x_test - mean) / std,
        y_test=torch.tensor(y_te, dtype=torch.int64),
        num_classes=10,
    )
