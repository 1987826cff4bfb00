"""Client partitioners: pure functions from labels to per-client index arrays.

Each partitioner is deterministic given its seed, so every process (rank) of a run computes
the same partition without communicating.
"""

from __future__ import annotations

import numpy as np

from fedbat.errors import ConfigError
from fedbat.registry import Registry

PARTITIONERS = Registry("data.partition", "partition")
MIN_CLIENT_SAMPLES = 10
_register = PARTITIONERS.register


@_register("iid")
def iid(labels: np.ndarray, num_clients: int, seed: int, **_: object) -> list[np.ndarray]:
    """Random split into equal shares (sizes differ by at most one).

    >>> parts = iid(np.arange(10) % 2, num_clients=3, seed=0)
    >>> [len(p) for p in parts]
    [4, 3, 3]
    """
    perm = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


@_register("dirichlet")
def dirichlet(
    labels: np.ndarray, num_clients: int, seed: int, alpha: float = 0.3, **_: object
) -> list[np.ndarray]:
    """Per class, client proportions ~ Dir(alpha); full clients get no more; redraw until
    every client holds at least ``MIN_CLIENT_SAMPLES`` samples.

    >>> parts = dirichlet(np.arange(1000) % 10, num_clients=5, seed=0, alpha=0.3)
    >>> sum(len(p) for p in parts), min(len(p) for p in parts) >= 10
    (1000, True)
    """
    n = len(labels)
    if n < MIN_CLIENT_SAMPLES * num_clients:
        raise ConfigError(
            f"data.num_clients={num_clients}: dirichlet needs >= {MIN_CLIENT_SAMPLES} samples "
            f"per client but the dataset has {n} samples"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _attempt in range(1000):
        shares: list[list[int]] = [[] for _ in range(num_clients)]
        for k in classes:
            idx_k = rng.permutation(np.flatnonzero(labels == k))
            p = rng.dirichlet(np.full(num_clients, alpha))
            p = p * np.array([len(s) < n / num_clients for s in shares])
            if not p.sum() > 0:  # a tiny alpha put all the mass on full clients: redraw
                break
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx_k)).astype(int)[:-1]
            for share, part in zip(shares, np.split(idx_k, cuts), strict=True):
                share.extend(part.tolist())
        else:
            if min(len(s) for s in shares) >= MIN_CLIENT_SAMPLES:
                return [np.sort(np.asarray(s, dtype=np.int64)) for s in shares]
    raise ConfigError(
        f"data.alpha={alpha}: no dirichlet partition gave every one of {num_clients} clients "
        f">= {MIN_CLIENT_SAMPLES} samples in 1000 draws; raise alpha or lower data.num_clients"
    )


ASSIGNMENTS = ("random", "authors")


@_register("label_count")
def label_count(
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    classes_per_client: int = 3,
    class_assignment: str = "random",
    **_: object,
) -> list[np.ndarray]:
    """Each client holds ``classes_per_client`` classes, picked greedily among the least-used
    classes, ties broken at random (``random``) or by class index as the FedBAT authors do
    (``authors``: 100 clients of 10 classes get 10 distinct sets of 3, each held by 10
    clients); each class is split equally among its holders.

    >>> parts = label_count(np.arange(100) % 10, num_clients=10, seed=0, classes_per_client=2)
    >>> sorted({len(np.unique((np.arange(100) % 10)[p])) for p in parts})
    [2]
    """
    if class_assignment not in ASSIGNMENTS:
        raise ConfigError(
            f"data.class_assignment={class_assignment!r}: must be one of {', '.join(ASSIGNMENTS)}"
        )
    classes = np.unique(labels)
    if not 1 <= classes_per_client <= len(classes):
        raise ConfigError(
            f"data.classes_per_client={classes_per_client}: must be in [1, {len(classes)}] "
            "(the dataset's number of classes)"
        )
    rng = np.random.default_rng(seed)
    usage = np.zeros(len(classes), dtype=np.int64)
    holders: list[list[int]] = [[] for _ in classes]
    for client in range(num_clients):
        tie_break = (
            np.arange(len(classes))
            if class_assignment == "authors"
            else rng.permutation(len(classes))
        )
        order = np.lexsort((tie_break, usage))
        for c in order[:classes_per_client]:
            usage[c] += 1
            holders[c].append(client)
    shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, owners in enumerate(holders):
        if not owners:
            continue
        idx_c = rng.permutation(np.flatnonzero(labels == classes[c]))
        for owner, part in zip(owners, np.array_split(idx_c, len(owners)), strict=True):
            shares[owner].append(part)
    return [np.sort(np.concatenate(s)).astype(np.int64) for s in shares]


def partition(
    name: str, labels: np.ndarray, num_clients: int, seed: int, **params: object
) -> list[np.ndarray]:
    """Split sample indices over ``num_clients`` clients with the partitioner ``name``; every
    client must hold at least one sample.

    >>> partition("iid", np.zeros(5), num_clients=6, seed=0)
    Traceback (most recent call last):
    ...
    fedbat.errors.ConfigError: data.num_clients=6: the iid partition of 5 training samples ...
    """
    parts = PARTITIONERS.get(name)(labels, num_clients=num_clients, seed=seed, **params)
    empty = sum(len(p) == 0 for p in parts)
    if empty:
        raise ConfigError(
            f"data.num_clients={num_clients}: the {name} partition of {len(labels)} training "
            f"samples leaves {empty} client(s) without data; lower data.num_clients"
        )
    return parts
