"""Strategies: each server rule against a hand computation, FedProx's client term, and every
strategy composed with compressors in real runs."""

import copy
import math

import lightning as L
import pytest
import torch
from torch import nn

import fedbat.compressors as C
from fedbat import checkpoint, clientstore
from fedbat.client import ClientJob, train_client
from fedbat.errors import ConfigError
from fedbat.lifecycle import run
from fedbat.seeding import sample_clients
from fedbat.strategies import STRATEGIES, build
from tests.conftest import make_cfg
from tests.helpers import components, rows, stable


def step(strategy, p0: float, deltas: list[float]) -> float:
    param = nn.Parameter(torch.tensor([p0], dtype=torch.float64), requires_grad=False)
    strategy.setup({"w": param})
    for d in deltas:
        strategy.apply({"w": torch.tensor([d], dtype=torch.float64)})
    return float(param)


def reddi(kind: str, deltas: list[float], lr=0.1, b1=0.9, b2=0.99, tau=1e-3) -> float:
    """Reddi et al. 2021, Algorithm 2, by hand on one coordinate (m = 0, v = tau^2 first)."""
    w, m, v = 0.0, 0.0, tau**2
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if kind == "fedadam":
            v = b2 * v + (1 - b2) * d * d
        elif kind == "fedyogi":
            v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d)
        else:
            v = v + d * d
        w += lr * m / (math.sqrt(v) + tau)
    return w


def test_fedavg_and_fedavgm_by_hand():
    assert step(build("fedavg"), 1.0, [0.5]) == 1.5
    assert step(build({"name": "fedavg", "lr": 0.5}), 1.0, [0.5]) == 1.25
    # momentum 0.9: buffer 1, then 0.9 + 1 = 1.9: w = 0 + 1 + 1.9
    assert step(build("fedavgm"), 0.0, [1.0, 1.0]) == pytest.approx(2.9, abs=1e-12)


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_rules_by_hand(kind):
    deltas = [2.0, -1.0, 0.5]
    got = step(build({"name": kind, "lr": 0.1}), 0.0, deltas)
    assert got == pytest.approx(reddi(kind, deltas), rel=1e-12, abs=1e-15)


def test_yogi_differs_from_adam_where_v_exceeds_delta_squared():
    deltas = [2.0, 0.1]  # second step: v ~ 0.04 > 0.01 = delta^2: Yogi shrinks v additively
    adam, yogi = (step(build({"name": k, "lr": 0.1}), 0.0, deltas) for k in ("fedadam", "fedyogi"))
    assert adam != yogi
    assert yogi == pytest.approx(reddi("fedyogi", deltas), rel=1e-12)


def test_weighted_mean_reaches_the_strategy(tmp_path):
    """The server hands the strategy the sample-weighted mean of the decoded updates."""
    from tests.helpers import round_results

    server, results = round_results(tmp_path, 3)
    seen = {}
    server.strategy.apply = lambda delta: seen.update(delta)  # record, do not move
    server.aggregate(results, {r.client for r in results})
    from fedbat.compressors import decode_update

    ups = [decode_update(r.data, server.plan, server.uplink)[0] for r in results]
    n = [r.num_samples for r in results]
    for name in server.params:
        want = sum(u[name].double() * w for u, w in zip(ups, n, strict=True)) / sum(n)
        assert torch.allclose(seen[name].double(), want, atol=1e-7), name


def test_the_round_updates_reach_the_strategy_read_once_each(tmp_path, monkeypatch):
    """With a thousand clients a round, their decoded updates would be a thousand models in
    memory: the strategy gets the packets as a sequence that decodes (and checks) on access,
    each packet is decoded once in a round of valid ones, and every rule gets the same bits
    from it as from the list of decoded updates."""
    import fedbat.intake
    from fedbat.compressors import decode_update
    from fedbat.intake import Checked
    from tests.helpers import round_results

    server, results = round_results(tmp_path, 3)
    given, decoded = [], []
    combine = server.strategy.combine
    server.strategy.combine = lambda updates, weights: (
        given.append(updates) or combine(updates, weights)
    )

    def counted(data, *args):
        decoded.append(data)
        return decode_update(data, *args)

    monkeypatch.setattr(fedbat.intake, "decode_update", counted)
    assert server.aggregate(results, {r.client for r in results}).accepted == [0, 1, 2]
    assert decoded == [r.data for r in results]  # once each, in client-id order
    assert isinstance(given[0], Checked) and len(given[0]) == 3
    assert given[0][0] is not given[0][0]  # decoded afresh, not kept
    ups = [decode_update(r.data, server.plan, server.uplink)[0] for r in results]
    for name in ("fedavg", "median", "trimmed_mean"):
        lazy = build(name).combine(given[0], [3, 1, 2])
        held = build(name).combine(ups, [3, 1, 2])
        assert all(torch.equal(lazy[k], held[k]) for k in held), name


@pytest.mark.parametrize("strategy", ["fedadam", "median"])
def test_an_invalid_packet_read_mid_combination_costs_exactly_its_own_client(tmp_path, strategy):
    """The combination stops at the invalid packet, and the server combines again without
    it: the model, the strategy's state (FedAdam's moments and step) and the logged figures
    are those of the round without that client, bit for bit."""
    from tests.helpers import forge_raw, round_results

    server, results = round_results(tmp_path, 4, f"strategy={strategy}")
    warm = server.aggregate(results, {0, 1, 2, 3})  # a strategy state to restore
    assert warm.accepted == [0, 1, 2, 3]
    without = copy.deepcopy(server)
    poisoned = list(results)
    poisoned[2] = copy.copy(results[2])
    poisoned[2].data, _ = forge_raw(results[2].data, server, 1e30)
    agg = server.aggregate(poisoned, {0, 1, 2, 3})
    ref = without.aggregate([results[i] for i in (0, 1, 3)], {0, 1, 2, 3})
    assert agg.accepted == ref.accepted == [0, 1, 3]
    assert list(agg.rejected) == [2] and "max_update_ratio" in agg.rejected[2]
    assert (agg.train_loss, agg.stats, agg.logs) == (ref.train_loss, ref.stats, ref.logs)
    for k, v in without.global_state().items():
        assert torch.equal(server.global_state()[k], v), k
    assert repr(server.strategy.state_dict()) == repr(without.strategy.state_dict())


def test_a_packet_the_rule_never_reads_is_still_checked(tmp_path):
    """A rule may read only some updates; none is accepted unread."""
    from fedbat.strategies.fedavg import FedAvg
    from tests.helpers import forge_raw, round_results

    class First(FedAvg):
        def combine(self, updates, weights):
            return {k: v.float() for k, v in updates[0].items()}

    server, results = round_results(tmp_path, 3)
    server.strategy = First()
    server.strategy.setup(server.params)
    results[2].data, _ = forge_raw(results[2].data, server, 1e30)
    agg = server.aggregate(results, {0, 1, 2})
    assert agg.accepted == [0, 1] and "max_update_ratio" in agg.rejected[2]


def test_unknown_strategy_and_parameters_fail_in_one_line():
    with pytest.raises(ConfigError, match=r"strategy='fedsgd': unknown strategy; available: "):
        build("fedsgd")
    with pytest.raises(ConfigError, match=r"strategy.beta3: not a parameter of strategy 'fedadam'"):
        build({"name": "fedadam", "beta3": 0.5})
    with pytest.raises(ConfigError, match=r"strategy.tau=0: must be in \(0.0, 1.0\]"):
        build({"name": "fedyogi", "tau": 0})


def test_fedprox_with_mu_0_equals_fedavg_bitwise(tmp_path):
    a = run(make_cfg(tmp_path / "avg", "compressor=fedbat"))
    b = run(make_cfg(tmp_path / "prox", "compressor=fedbat", "strategy=fedprox", "strategy.mu=0"))
    assert a == b
    ha, hb = (checkpoint.load(tmp_path / d / "checkpoint.pt") for d in ("avg", "prox"))
    assert stable(ha["history"]) == stable(hb["history"])
    for k, v in ha["server"]["global"].items():
        assert torch.equal(v, hb["server"]["global"][k]), k


def test_fedprox_pulls_clients_towards_the_global_model(tmp_path):
    """A large mu keeps each client's update small: after a round the global model has
    moved less from where it started than under FedAvg."""
    from fedbat.assembly import build_datamodule, build_task

    cfg = make_cfg(tmp_path / "avg", "fed.rounds=1")
    start = build_task(cfg, build_datamodule(cfg)).state_dict()
    run(cfg)
    run(make_cfg(tmp_path / "prox", "fed.rounds=1", "strategy=fedprox", "strategy.mu=10"))
    moved = {}
    for d in ("avg", "prox"):
        end = checkpoint.load(tmp_path / d / "checkpoint.pt")["server"]["global"]
        moved[d] = sum(float((end[k] - v).float().norm()) for k, v in start.items())
    assert 0 < moved["prox"] < 0.5 * moved["avg"], moved


@pytest.mark.parametrize("compressor", ["none", "fedbat"])
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_composes_with_compressors(tmp_path, name, compressor):
    """A round of every pair: every client accepted, a finite model that moved, and uplink
    bits equal to the bytes of packets of the strategy's layout (its extra tensors too)."""
    args = (f"strategy={name}", f"compressor={compressor}", "fed.rounds=1")
    if name == "fedbuff":  # asynchronous: a round of all that train at once, its buffer
        args += ("system.compute_s_per_sample=0.01", "strategy.buffer_size=10")
    run(make_cfg(tmp_path, *args))
    (row,) = rows(tmp_path)
    parts = components(tmp_path / "x", *args)
    server = parts.server()
    update = {s.name: torch.randn(s.shape).to(s.dtype) for s in server.packet_plan}
    size = C.encode_update(update, server.packet_plan, parts.uplink, torch.Generator()).bits
    cfg = parts.cfg
    assert int(float(row["bits/uplink"])) == cfg.fed.clients_per_round * size
    assert int(float(row["clients/accepted"])) == cfg.fed.clients_per_round
    end = checkpoint.load(tmp_path / "checkpoint.pt")["server"]["global"]
    assert all(torch.isfinite(v.float()).all() for v in end.values())
    assert any(not torch.equal(end[k], v) for k, v in server.global_state().items())


def test_fedavg_with_no_compression_is_the_weighted_mean_of_the_clients(tmp_path):
    """The round's model, recomputed apart from the server: each sampled client trained from
    the initial model, its update weighted by its samples (unequal: Dirichlet), in float64."""
    args = ("fed.rounds=1", "data.partition=dirichlet", "data.alpha=0.3")
    run(make_cfg(tmp_path, *args))
    parts = components(tmp_path / "x", *args)
    start = parts.server().global_state()
    cfg = parts.cfg
    sampled = sample_clients(cfg.seed, 0, cfg.data.num_clients, cfg.fed.clients_per_round)
    total, acc = 0, {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in start.items()}
    for c in sampled:
        res = train_client(parts.setup, ClientJob(client=c, round=0, held=start))
        update, _ = C.decode_update(res.data, parts.plan, parts.uplink)
        total += res.num_samples
        for k, v in update.items():
            acc[k] += res.num_samples * v.double()
    assert len({parts.data.client_size(c) for c in sampled}) > 1
    end = checkpoint.load(tmp_path / "checkpoint.pt")["server"]["global"]
    for s in parts.plan:
        want = start[s.name].double() + acc[s.name] / total
        assert torch.allclose(end[s.name].double(), want.to(s.dtype).double(), atol=1e-6), s.name


def test_adaptive_state_survives_a_resume_bitwise(tmp_path):
    args = ("strategy=fedyogi", "strategy.lr=0.1", "compressor=ef_signsgd")
    run(make_cfg(tmp_path / "whole", *args, "fed.rounds=4"))
    run(make_cfg(tmp_path / "split", *args, "fed.rounds=2"))
    run(make_cfg(tmp_path / "split", *args, "fed.rounds=4"))
    a, b = (checkpoint.load(tmp_path / d / "checkpoint.pt") for d in ("whole", "split"))
    assert stable(a["history"]) == stable(b["history"])
    for part in ("m", "v"):
        for k, t in a["server"]["strategy"][part].items():
            assert torch.equal(t, b["server"]["strategy"][part][k]), (part, k)


def test_robust_rules_by_hand():
    ups = [
        {"w": torch.tensor([1.0, -1.0])},
        {"w": torch.tensor([2.0, 5.0])},
        {"w": torch.tensor([100.0, 0.0])},
    ]
    assert build("median").combine(ups, [1, 1, 1])["w"].tolist() == [2.0, 0.0]
    assert build("median").combine(ups[:2], [1, 1])["w"].tolist() == [1.5, 2.0]
    trimmed = build({"name": "trimmed_mean", "trim": 0.34}).combine(ups, [1, 1, 1])
    assert trimmed["w"].tolist() == [2.0, 0.0]  # one value dropped at each end
    untrimmed = build("trimmed_mean").combine(ups, [1, 1, 1])["w"].tolist()  # 10% of 3: none
    assert untrimmed == pytest.approx([103 / 3, 4 / 3])
    mean = build("fedavg").combine(ups, [2, 1, 1])["w"].tolist()
    assert mean == pytest.approx([(2 + 2 + 100) / 4, (-2 + 5 + 0) / 4])


def test_median_resists_a_poisoned_update_that_passes_validation(tmp_path):
    """A forged parameter value of 5 (finite, inside the norm bound) moves the FedAvg model
    far, the median model barely."""
    from tests.helpers import forge_raw, round_results

    moved = {}
    for name in ("fedavg", "median"):
        server, results = round_results(tmp_path / name, 5)
        server.strategy = build(name)
        server.strategy.setup(server.params)
        before = server.global_state()
        results[0].data, _ = forge_raw(results[0].data, server, 5.0)
        assert len(server.aggregate(results, {r.client for r in results}).accepted) == 5
        after = server.global_state()
        moved[name] = max(float((after[k] - before[k]).abs().max()) for k in server.params)
    assert moved["median"] < 0.1 < moved["fedavg"], moved


class Quadratic(L.LightningModule):
    """One weight ``w`` (0 at first); client ``a``'s loss is ``(w - a)^2 / 2``; SGD lr 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return 0.5 * ((self.w - batch) ** 2).sum()

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("test/loss", 0.5 * ((self.w - batch) ** 2).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Targets:
    """Client ``i`` holds the one sample ``targets[i]`` (a real ``ClientData``)."""

    def __init__(self, targets: list[float]) -> None:
        self.targets, self.num_clients = targets, len(targets)

    def client_size(self, client: int) -> int:
        return 1

    def client_batches(self, client, batch_size, generator, device):
        yield torch.tensor([self.targets[client]], device=device)

    def test_batches(self, batch_size, device):
        yield torch.tensor(self.targets, device=device)


def test_scaffold_control_variates_by_hand(tmp_path):
    """Two clients with targets 1 and -3, both sampled, K = 2 steps of lr 0.5 (K lr = 1).

    Round 0 (x = 0, c = c_1 = c_2 = 0): client 1 steps 0 -> 0.5 -> 0.75, so dy_1 = 0.75 and
    c_1 = -dy_1 / (K lr) = -0.75; client 2 steps 0 -> -1.5 -> -2.25, c_2 = 2.25. Server:
    x = 0 + (0.75 - 2.25) / 2 = -0.75; c = (-0.75 + 2.25) / 2 = 0.75.
    Round 1: client 1's gradients get c - c_1 = 1.5: -0.75 -> -0.625 -> -0.5625 (dy 0.1875),
    c_1 = c_1 - c + (x - y) / (K lr) = -0.75 - 0.75 - 0.1875 = -1.6875; client 2's get -1.5:
    -0.75 -> -1.125 -> -1.3125 (dy -0.5625), c_2 = 2.25 - 0.75 + 0.5625 = 2.0625.
    Server: x = -0.75 + (0.1875 - 0.5625) / 2 = -0.9375; c = 0.75 + (-0.9375 - 0.1875) / 2
    = 0.1875 = mean(c_i).
    """
    args = ("strategy=scaffold", "compressor=none", "fed.clients_per_round=2")
    args += ("fed.local_epochs=2", "fed.batch_size=1", "trainer.threads=1")
    want = {1: (-0.75, 0.75, -0.75, 2.25), 2: (-0.9375, 0.1875, -1.6875, 2.0625)}
    for rounds, (x, c, c1, c2) in want.items():
        cfg = make_cfg(tmp_path / str(rounds), *args, f"fed.rounds={rounds}")
        run(cfg, task=Quadratic(), data=Targets([1.0, -3.0]))
        state = checkpoint.load(tmp_path / str(rounds) / "checkpoint.pt")
        assert state["server"]["global"]["w"].item() == x
        assert state["server"]["strategy"]["c"]["w"].item() == c
        assert state["server"]["held_extra"]["scaffold/w"].item() == c  # as the clients hold it
        kept = clientstore.read(tmp_path / str(rounds), state)
        assert kept["0/state/scaffold/w"].item() == c1
        assert kept["1/state/scaffold/w"].item() == c2


def test_scaffold_traffic_goes_through_the_compressors_and_is_counted(tmp_path):
    """The control-variate change rides in each client's packet and the server variate in
    the broadcast: more bits than FedAvg in both directions, compressed by FedBAT."""
    bits = {}
    for name in ("fedavg", "scaffold"):
        run(make_cfg(tmp_path / name, f"strategy={name}", "compressor=fedbat", "fed.rounds=1"))
        row = checkpoint.load(tmp_path / name / "checkpoint.pt")["history"][0]
        bits[name] = row["bits/uplink"], row["bits/downlink"]
    (avg_up, avg_down), (sc_up, sc_down) = bits["fedavg"], bits["scaffold"]
    assert 1.5 * avg_up < sc_up < 3 * avg_up  # a second, equally compressed model's worth
    assert 1.5 * avg_down < sc_down < 3 * avg_down


def test_weighted_sum_refuses_updates_of_other_tensors():
    from fedbat.strategies.base import weighted_sum

    ups = [{"w": torch.ones(2), "b": torch.ones(1)}, {"b": torch.ones(1), "w": torch.ones(2)}]
    assert weighted_sum(ups, [1, 1], lambda _n, w: w / 2)["w"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="an update of tensors"):
        weighted_sum([{"w": torch.ones(2)}, {"v": torch.ones(2)}], [1, 1], lambda _n, w: w)
