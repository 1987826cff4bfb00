import pytest
import torch

from fedbat.datamodules import FederatedDataModule, load
from fedbat.datamodules.federated import crop_flip
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


def test_missing_fmnist_names_the_debian_package(tmp_path):
    """An explicit data.root is the only place looked in, even where the files are installed."""
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        load("fmnist", root=str(tmp_path))
    assert f"looked in {tmp_path})" in str(err.value)


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


def _write_cifar_bin(root, folder: str, files: list[str], label_bytes: int, n: int) -> None:
    import numpy as np

    (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for f in files:
        rec = rng.integers(0, 256, (n, label_bytes + 3072), dtype=np.uint8)
        rec[:, label_bytes - 1] = np.arange(n) % (10 if label_bytes == 1 else 100)
        rec.tofile(root / folder / f)


def test_cifar10_binary_files_are_read(tmp_path):
    files = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    _write_cifar_bin(tmp_path, "cifar-10-batches-bin", files, 1, 20)
    s = load("cifar10", root=str(tmp_path))
    assert s.x_train.shape == (100, 3, 32, 32) and s.x_test.shape == (20, 3, 32, 32)
    assert s.y_train[:10].tolist() == list(range(10)) and s.augment and s.num_classes == 10


def test_cifar100_fine_labels(tmp_path):
    _write_cifar_bin(tmp_path, "cifar-100-binary", ["train.bin", "test.bin"], 2, 150)
    s = load("cifar100", root=str(tmp_path))
    assert s.num_classes == 100 and int(s.y_train.max()) == 99


def test_svhn_mat_files_are_read(tmp_path):
    import numpy as np
    from scipy.io import savemat

    for name, n in (("train_32x32.mat", 12), ("test_32x32.mat", 5)):
        x = np.random.default_rng(0).integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        savemat(tmp_path / name, {"X": x, "y": (np.arange(n) % 10 + 1).reshape(-1, 1)})
    s = load("svhn", root=str(tmp_path))
    assert s.x_train.shape == (12, 3, 32, 32) and s.y_train.tolist()[:10] == [
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        8,
        9,
        0,
    ]


def test_standard_dataloaders_for_code_that_wants_them():
    dm = FederatedDataModule("digits", num_clients=4, seed=0)
    dm.setup()
    xb, yb = next(iter(dm.client_dataloader(1, batch_size=8)))
    assert xb.shape == (8, 1, 8, 8) and yb.shape == (8,)
    assert sum(len(y) for _, y in dm.test_dataloader()) == len(dm.data.y_test)
