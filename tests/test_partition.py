import numpy as np
import pytest

from fedbat.datamodules.partition import MIN_CLIENT_SAMPLES, dirichlet, iid, label_count, partition
from fedbat.errors import ConfigError

LABELS = np.repeat(np.arange(10), 600)  # 6000 samples, 10 balanced classes
rng_labels = np.random.default_rng(1).integers(0, 10, 5000)


def _check_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == len(np.unique(allidx)), "a sample is given to two clients"
    assert allidx.min() >= 0 and allidx.max() < n


def test_iid_equal_sizes_and_determinism():
    parts = iid(LABELS, num_clients=7, seed=3)
    assert sorted({len(p) for p in parts}) == [857, 858]
    _check_cover(parts, len(LABELS))
    assert sum(map(len, parts)) == len(LABELS)
    again = iid(LABELS, num_clients=7, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = iid(LABELS, num_clients=7, seed=4)
    assert not np.array_equal(parts[0], other[0])


@pytest.mark.parametrize("alpha", [0.1, 0.3, 100.0])
def test_dirichlet_covers_all_and_min_size(alpha):
    parts = dirichlet(rng_labels, num_clients=50, seed=0, alpha=alpha)
    _check_cover(parts, len(rng_labels))
    assert sum(map(len, parts)) == len(rng_labels)
    assert min(map(len, parts)) >= MIN_CLIENT_SAMPLES


def test_dirichlet_skew_follows_alpha():
    def mean_classes(alpha: float) -> float:
        parts = dirichlet(LABELS, num_clients=20, seed=0, alpha=alpha)
        return float(np.mean([len(np.unique(LABELS[p])) for p in parts]))

    assert mean_classes(0.1) < mean_classes(1000.0)
    assert mean_classes(1000.0) == 10.0


def test_dirichlet_deterministic():
    a = dirichlet(LABELS, 10, seed=5, alpha=0.3)
    b = dirichlet(LABELS, 10, seed=5, alpha=0.3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_dirichlet_too_few_samples_is_clear():
    with pytest.raises(ConfigError, match="num_clients=100"):
        dirichlet(np.arange(500) % 10, num_clients=100, seed=0)


def test_label_count_classes_and_balance():
    parts = label_count(LABELS, num_clients=100, seed=0, classes_per_client=3)
    _check_cover(parts, len(LABELS))
    assert all(len(np.unique(LABELS[p])) == 3 for p in parts)
    holders = np.zeros(10, dtype=int)
    for p in parts:
        holders[np.unique(LABELS[p])] += 1
    assert holders.max() - holders.min() <= 1  # greedy balance: 300 slots over 10 classes
    # each class is split equally among its holders
    for c in range(10):
        sizes = [int((LABELS[p] == c).sum()) for p in parts if (LABELS[p] == c).any()]
        assert max(sizes) - min(sizes) <= 1


def test_label_count_more_than_classes_fails():
    with pytest.raises(ConfigError, match=r"classes_per_client=11.*\[1, 10\]"):
        label_count(LABELS, num_clients=5, seed=0, classes_per_client=11)


def test_unknown_partition_lists_available():
    with pytest.raises(ConfigError, match="available: iid, dirichlet, label_count"):
        partition("shards", LABELS, 5, 0)
