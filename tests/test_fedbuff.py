"""FedBuff (``strategy=fedbuff``, ``fedbat/buffered.py``): the event order of buffered
rounds against hand-worked timelines, the staleness-discounted aggregate against the paper's
formula, and real runs that are deterministic and resume bitwise."""

import csv
import itertools
import math
from pathlib import Path

import pytest
import torch

from fedbat.buffered import Buffered
from fedbat.cli import main
from fedbat.client import ClientResult
from fedbat.devices import Clock, Devices, Profile
from fedbat.downlink import Delivery
from fedbat.lifecycle import run
from fedbat.strategies import build
from tests.conftest import make_cfg


def play_rounds(devices: Devices, concurrency: int, buffer: int, rounds: int):
    """Each round's (end time, {client: staleness}, dropped); clients train for free and
    send nothing, so a client's time is its compute: (client + 1) s for its one sample."""
    clock = Clock(devices)
    buffered = Buffered(clock, concurrency, buffer, seed=0)

    def deliver(clients):
        return [Delivery(c, (), 0, 0) for c in clients]

    def train(sent):
        return [ClientResult(client=d.client, num_samples=1) for d in sent]

    out = []
    for r in range(rounds):
        rnd = buffered.play(r, deliver, train, lambda c: 1)
        out.append((clock.now, {f.client: r - f.version for f in rnd.arrived}, rnd.dropped))
    return out


def speeds(n: int, intervals=None) -> Devices:
    return Devices(n, lambda c: Profile(c + 1.0, math.inf, math.inf, 0.0), intervals)


def test_buffered_rounds_follow_the_hand_worked_event_order():
    """4 clients of 1, 2, 3 and 4 s, all training at once, a buffer of 2. Round 1: clients 0
    and 1 arrive at 1 and 2 s. Round 2 restarts them at 2 s (version 1): 0 arrives at 3 s
    beside client 2 (version 0, staleness 1; ties by client id). Round 3 restarts 0 and 2 at
    3 s: 0 (4 s) and 1 (version 1, staleness 1) arrive at 4 s, before 3 (4 s, but id 3)."""
    assert play_rounds(speeds(4), 4, 2, 3) == [
        (2.0, {0: 0, 1: 0}, 0),
        (3.0, {0: 0, 2: 1}, 0),
        (4.0, {0: 0, 1: 1}, 0),
    ]


def test_a_client_that_goes_offline_in_flight_drops_out_and_frees_its_slot():
    """Client 1 (2 s) is online only until 1.5 s: it drops out then, and its slot finds no
    free client (0 is training), so round 2 ends with client 0's second arrival at 2 s."""
    devices = speeds(2, {1: [(0.0, 1.5)]})
    assert play_rounds(devices, 2, 1, 2) == [(1.0, {0: 0}, 0), (2.0, {0: 0}, 1)]


def test_the_aggregate_is_the_papers_discounted_sum():
    """Nguyen et al. 2022, Alg. 1: sum_k (1 + tau_k)^-1/2 delta_k / K, then server SGD."""
    strategy = build({"name": "fedbuff", "lr": 1.0, "buffer_size": 3})
    updates = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([4.0, 0.0])},
               {"w": torch.tensor([0.0, 9.0])}]  # fmt: skip
    staleness = [0, 3, 8]
    weights = [strategy.weight(600.0, tau) for tau in staleness]  # samples do not count
    assert weights == [1.0, 0.5, 1 / 3]
    got = strategy.combine(updates, weights)["w"]
    by_hand = torch.tensor([(1 + 4 * 0.5) / 3, (2 + 9 / 3) / 3])
    torch.testing.assert_close(got, by_hand)


def rows(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "metrics.csv") as f:
        return [
            {k: float(v) for k, v in r.items() if v and not k.startswith("time/")}
            for r in csv.DictReader(f)
        ]


JOB = ["strategy=fedbuff", "strategy.buffer_size=4", "network.uplink_mbps=1",
       "network.downlink_mbps=10", "system.compute_s_per_sample=0.005",
       "system.compute_spread=1.0", "compressor=ef_signsgd"]  # fmt: skip


def test_fedbuff_trains_stale_clients_and_resumes_bitwise(tmp_path):
    """10 training at once, every 4 arrivals aggregated: later rounds hold stale updates;
    stopped after round 2 and resumed, the run equals the uninterrupted one (the clients in
    flight and their packets are in the checkpoint)."""
    whole = run(make_cfg(tmp_path / "whole", *JOB, "fed.rounds=4"))
    run(make_cfg(tmp_path / "cut", *JOB, "fed.rounds=2"))
    assert run(make_cfg(tmp_path / "cut", *JOB, "fed.rounds=4")) == whole
    history = rows(tmp_path / "whole")
    assert rows(tmp_path / "cut") == history
    assert [r["clients/accepted"] for r in history] == [4, 4, 4, 4]
    assert history[0]["clients/started"] == 10 + 3  # the slots the first 3 arrivals freed
    assert max(r["fedbuff/staleness_max"] for r in history) >= 1
    assert all(b["sim/clock_s"] > a["sim/clock_s"] for a, b in itertools.pairwise(history))
    assert whole["final_acc"] > 0.3


@pytest.mark.parametrize(
    "extra,needle",
    [
        ([], "strategy=fedbuff: asynchronous rounds need client times"),
        (
            ["system.compute_s_per_sample=0.01", "system.deadline_s=5"],
            "system.deadline_s=5: a synchronous round policy",
        ),
        (
            ["system.compute_s_per_sample=0.01", "strategy.buffer_size=21"],
            "strategy.buffer_size=21: must be in [1, 20]",
        ),
        (["system.compute_s_per_sample=0.01", "privacy=dp"], "privacy=dp with strategy=fedbuff"),
    ],
)
def test_fedbuff_refuses_what_it_cannot_run(tmp_path, capsys, extra, needle):
    code = main(["train", f"hydra.run.dir={tmp_path / 'r'}", "strategy=fedbuff", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()
