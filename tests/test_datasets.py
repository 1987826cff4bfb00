import pytest
import torch

from datamodules import FederatedDataModule, load
from datamodules.federated import crop_flip
from fedbat.errors import ConfigError, DataNotFoundError
from tests.conftest import needs_fmnist


@needs_fmnist
def test_fmnist_real_files():
    s = load("fmnist")
    assert s.x_train.shape == (60000, 1, 28, 28) and s.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(s.y_train).tolist() == [6000] * 10
    assert torch.bincount(s.y_test).tolist() == [1000] * 10
    assert abs(s.x_train.mean().item()) < 0.01 and abs(s.x_train.std().item() - 1) < 0.02


def test_digits_embedded():
    s = load("digits")
    assert s.input_shape == (1, 8, 8) and s.num_classes == 10
    assert len(s.y_train) + len(s.y_test) == 1797


def test_synthetic_any_shape_is_seeded():
    a = load("synthetic", shape=[3, 5, 5], num_classes=4, train_size=50, test_size=10, seed=1)
    b = load("synthetic", shape=[3, 5, 5], num_classes=4, train_size=50, test_size=10, seed=1)
    assert a.x_train.shape == (50, 3, 5, 5) and torch.equal(a.x_train, b.x_train)


def test_missing_dataset_says_where_and_how(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load("cifar10", root=str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path) in msg and "\n" not in msg


def test_missing_fmnist_names_the_debian_package(tmp_path, monkeypatch):
    import datamodules.datasets.fmnist as fm

    monkeypatch.setattr(fm, "DEFAULT_ROOTS", ())
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load("fmnist", root=str(tmp_path))


def test_unknown_dataset_lists_available():
    with pytest.raises(ConfigError, match=r"available: .*digits.*fmnist"):
        load("imagenet")


def test_client_batches_are_seeded_and_cover_client():
    dm = FederatedDataModule("digits", num_clients=5, partition="dirichlet", seed=0)
    dm.setup()

    def epoch(seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [y for _, y in dm.client_batches(2, 16, g, torch.device("cpu"))]

    a, b = epoch(1), epoch(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert sum(len(y) for y in a) == dm.client_size(2)
    assert sorted(torch.cat(a).tolist()) == sorted(dm.data.y_train[dm.client_indices[2]].tolist())


def test_crop_flip_keeps_shape_and_content():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape
    assert set(out.unique().tolist()) <= set(x.unique().tolist()) | {0.0}
