"""Every compressor trains FMNIST cnn4, on the uplink and the downlink at once: one round of
two clients each (in this process: the command line's own path is tested elsewhere)."""

import pytest

import fedbat.compressors as C
from fedbat.lifecycle import run
from tests.conftest import make_cfg, needs_fmnist
from tests.helpers import rows

ARGS = ["data=fmnist", "model=cnn4", "data.num_clients=100", "fed.clients_per_round=2",
        "fed.rounds=1", "fed.local_epochs=1", "fed.batch_size=64"]  # fmt: skip


@pytest.mark.slow
@needs_fmnist
@pytest.mark.parametrize("name", C.available())
def test_every_compressor_trains_fmnist_cnn4_both_ways(tmp_path, name):
    run(make_cfg(tmp_path, f"compressor={name}", *ARGS))
    (row,) = rows(tmp_path)
    assert 0.0 <= float(row["test/acc"]) <= 1.0 and float(row["train/loss"]) > 0
    assert int(float(row["clients/accepted"])) == 2
    assert int(float(row["bits/downlink"])) > 0 and int(float(row["bits/uplink"])) > 0
