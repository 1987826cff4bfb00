"""The FedBAT paper's protocol, exactly: experiment configs, the authors' label-count
assignment, their normalisation constants and their aggregation weights."""

import numpy as np
import pytest
import torch

from fedbat.compose import compose
from fedbat.datamodules.partition import label_count
from tests.conftest import needs_fmnist

PAPER = {
    "fmnist_paper": ("fmnist", "cnn4", 100),
    "svhn_paper": ("svhn", "cnn4", 100),
    "cifar10_paper": ("cifar10", "resnet10", 200),
    "cifar100_paper": ("cifar100", "resnet10", 200),
}


@pytest.mark.parametrize("experiment", sorted(PAPER))
@pytest.mark.parametrize("compressor", ["fedbat", "signsgd"])
def test_paper_experiments_send_the_downlink_in_fp32(experiment, compressor):
    cfg = compose([f"experiment={experiment}", f"compressor={compressor}"])
    data, model, rounds = PAPER[experiment]
    assert (cfg.data.name, cfg.model.name, cfg.fed.rounds) == (data, model, rounds)
    assert cfg.compressor.name == compressor and cfg.compressor.downlink == "none"
    assert (cfg.fed.local_epochs, cfg.fed.batch_size, cfg.fed.lr) == (10, 64, 0.1)
    assert cfg.fed.weight_by == "batches" and cfg.data.class_assignment == "authors"
    # the command line still wins over the experiment
    assert (
        compose([f"experiment={experiment}", "compressor.downlink=fedbat"]).compressor.downlink
        == "fedbat"
    )


def test_cifar100_paper_uses_dirichlet_0_1_and_10_classes():
    cfg = compose(["experiment=cifar100_paper"])
    assert cfg.data.alpha == 0.1 and cfg.data.classes_per_client == 10


def test_authors_label_count_gives_10_sets_of_3_classes_each_held_by_10_clients():
    labels = np.repeat(np.arange(10), 600)
    parts = label_count(labels, 100, seed=0, classes_per_client=3, class_assignment="authors")
    sets = [tuple(np.unique(labels[p])) for p in parts]
    assert len(set(sets)) == 10 and all(sets.count(s) == 10 for s in set(sets))
    assert sets[:4] == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 1, 9)]  # least used, then index
    random = label_count(labels, 100, seed=0, classes_per_client=3)
    assert len({tuple(np.unique(labels[p])) for p in random}) > 10  # the random tie-break


@needs_fmnist
def test_fmnist_per_split_normalisation_uses_the_test_statistics():
    from fedbat.datamodules.datasets import load

    train_stats = load("fmnist")
    per_split = load("fmnist", normalize="per_split")
    assert torch.equal(train_stats.x_train, per_split.x_train)
    assert (
        abs(float(per_split.x_test.mean())) < 2e-3 and abs(float(per_split.x_test.std()) - 1) < 2e-3
    )
    assert abs(float(train_stats.x_test.mean())) > 2e-3  # the train stats leave it off-centre


def test_weighting_by_batches(tmp_path):
    from tests.helpers import round_results

    server, results = round_results(tmp_path, 2)
    assert [server.weight(n) for n in (64, 65, 1)] == [64, 65, 1]
    server.weight_batch_size = 64
    assert [server.weight(n) for n in (64, 65, 1)] == [1, 2, 1]
    assert server.aggregate(results, {r.client for r in results}).accepted == [0, 1]
