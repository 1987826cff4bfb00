"""Bring your own model and dataset: register them, then hand fedbat the command line.

    python examples/custom_model_and_data.py train data.name=breast_cancer \
        model.name=tabular_mlp data.num_clients=10 fed.clients_per_round=5 compressor=fedbat

Registering is all it takes: config validation, ``list`` and the loop all read the
registries, and every process Fabric launches re-runs this script, so every rank knows the
same names. Keys of the selected config groups (``model.hidden`` of the default ``mlp``
group here) arrive as keyword arguments.
"""

from __future__ import annotations

import math
import sys

import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from torch import nn

from fedbat.cli import main
from fedbat.datamodules.datasets import Splits
from fedbat.datamodules.datasets import register as register_dataset
from fedbat.models import register as register_model


@register_dataset("breast_cancer")
def breast_cancer(**_: object) -> Splits:
    """scikit-learn's breast-cancer table (569 x 30 features, 2 classes), standardised."""
    x, y = load_breast_cancer(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0)

    def features(a):
        return torch.tensor((a - mean) / std, dtype=torch.float32)

    return Splits(
        features(x_tr), torch.tensor(y_tr), features(x_te), torch.tensor(y_te), num_classes=2
    )


@register_model("tabular_mlp")
def tabular_mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 64, **_) -> nn.Module:
    """One hidden layer; its weight matrices are what the compressors compress."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
