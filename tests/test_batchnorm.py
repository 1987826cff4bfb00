"""BatchNorm statistics rules (fed.bn_stats): recompute and batch statistics against
statistics computed by hand, and each rule end to end through ``fedbat.fit``."""

import csv

import pytest
import torch
from torch import nn

import fedbat
from fedbat import checkpoint
from fedbat.batchnorm import batch_statistics, proxy_batches, recompute, statistics_names
from fedbat.datamodules.dataset import from_datamodule
from tests.user_project.lit import BatchNormClassifier, DigitsDataModule

STATS = ["net.2.running_mean", "net.2.running_var", "net.2.num_batches_tracked"]


class Net(nn.Module):
    """A BatchNorm layer with the training_step contract fedbat calls."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.bn(batch).sum()


def test_recompute_is_the_plain_mean_of_the_batch_statistics():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 3, generator=gen) * 2 + 5 for n in (4, 7, 5)]
    net = Net().eval()
    net.bn.running_mean.fill_(100.0)  # stale values that must not leak into the estimate
    net.bn.num_batches_tracked.fill_(9)
    recompute(net, batches)
    mean = sum(b.mean(0) for b in batches) / 3  # by hand: momentum None averages batches
    var = sum(b.var(0, unbiased=True) for b in batches) / 3
    torch.testing.assert_close(net.bn.running_mean, mean)
    torch.testing.assert_close(net.bn.running_var, var)
    assert int(net.bn.num_batches_tracked) == 9 and net.bn.momentum == 0.1 and not net.training


def test_batch_statistics_normalise_by_the_batch_and_leave_the_running_ones():
    bn = nn.BatchNorm1d(2).eval()
    x = torch.tensor([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]])
    with batch_statistics(bn):
        out = bn(x)
    by_hand = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + bn.eps)
    torch.testing.assert_close(out, by_hand)
    assert bn.running_mean.tolist() == [0.0, 0.0] and int(bn.num_batches_tracked) == 0
    torch.testing.assert_close(bn(x), x / (1 + bn.eps) ** 0.5)  # running statistics again


def fit(tmp_path, rule: str):
    torch.manual_seed(0)
    module = BatchNormClassifier()
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    args = ["fed.rounds=2", "progress=false", "data.num_clients=4", "fed.clients_per_round=2",
            f"fed.bn_stats={rule}", f"run_dir={tmp_path}"]  # fmt: skip
    fedbat.fit(module, DigitsDataModule(), overrides=args)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return initial, checkpoint.load(tmp_path / "checkpoint.pt")["server"]["global"], rows


@pytest.fixture(scope="module")
def averaged(tmp_path_factory):
    """The same run with the default rule, once for the module."""
    return fit(tmp_path_factory.mktemp("average"), "average")


def test_local_statistics_never_travel_and_the_server_keeps_none(tmp_path, averaged):
    assert sorted(statistics_names(BatchNormClassifier())) == sorted(STATS)
    initial, final, rows = fit(tmp_path / "local", "local")
    _, averaged, base = averaged
    for name in STATS:  # the server's copy is the initial one: nothing came back
        assert torch.equal(final[name], initial[name]), name
        assert not torch.equal(averaged[name], initial[name]) or "num_batches" in name
    stats_bits = 32 * (32 + 32) + 64  # two fp32 vectors of 32 and an int64 counter
    per_client = int(base[1]["bits/uplink"]) - int(rows[1]["bits/uplink"])
    assert per_client >= 2 * stats_bits  # two clients a round, each without them
    assert float(rows[-1]["val_acc"]) > 0.3  # evaluated with batch statistics, and learning


def test_recompute_sets_the_servers_statistics_from_the_proxy_clients(tmp_path, averaged):
    _, final, _ = fit(tmp_path / "re", "recompute")
    _, averaged, _ = averaged
    # by hand: the proxy is all 4 clients (fed.bn_clients=10 > 4), in the order drawn
    data = from_datamodule(DigitsDataModule(), num_clients=4)
    batches = [b["image"] for b in proxy_batches(data, 10, 32, 0, _Cpu())]
    x = torch.cat(batches)
    assert len(x) == len(data.train)  # every training sample, once
    model = BatchNormClassifier()
    model.load_state_dict(final)
    with torch.no_grad():
        h = [model.net[1](torch.flatten(b, 1)) for b in batches]
    mean = sum(v.mean(0) for v in h) / len(h)
    var = sum(v.var(0) for v in h) / len(h)
    torch.testing.assert_close(final["net.2.running_mean"], mean)
    torch.testing.assert_close(final["net.2.running_var"], var)
    assert not torch.allclose(averaged["net.2.running_mean"], mean, atol=1e-3)
    assert torch.equal(final["net.2.num_batches_tracked"], averaged["net.2.num_batches_tracked"])


class _Cpu:
    device = torch.device("cpu")


@pytest.mark.parametrize("value", ["mean", "", "None"])
def test_a_bad_rule_is_one_line(tmp_path, capsys, value):
    from fedbat.cli import main

    code = main(["train", f"fed.bn_stats={value}", f"hydra.run.dir={tmp_path}/r"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not (tmp_path / "r").exists() and len(err.splitlines()) == 1, err
    assert "fed.bn_stats" in err and "average" in err
