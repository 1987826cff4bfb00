"""Central DP-FedAvg: the mechanism against hand computations (clipping, uniform weights, the
noise's spread), its epsilon against the RDP formulas worked apart from the code and against
dp-accounting composed round by round, the budget stop, resume, and what is refused."""

import csv
import json
import math

import pytest
import torch

import fedbat.compressors as C
from fedbat import checkpoint
from fedbat.compose import compose
from fedbat.config import run_strategy, validate
from fedbat.errors import ConfigError
from fedbat.lifecycle import run
from fedbat.strategies.privacy import DPFedAvg
from fedbat.strategies.privacy_budget import Privacy, accounting, epsilon, local_epsilon
from tests.conftest import make_cfg
from tests.helpers import assert_same_run

dp_accounting = accounting()  # never a bare import: see accounting()
RdpAccountant = dp_accounting.rdp.RdpAccountant
DP = ("privacy=dp", "trainer.threads=1")


def rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def eps(z: float, population: int, per_round: int, rounds: int) -> float:
    return epsilon(Privacy(noise_multiplier=z), population, per_round, rounds)


def dp(clip=1.0, z=1.0, per_round=2, **kw) -> DPFedAvg:
    from fedbat.strategies import build

    settings = Privacy(clip=clip, noise_multiplier=z, **kw)
    strategy = DPFedAvg(settings, seed=0, num_clients=10, per_round=per_round)
    return strategy.wrap(build("fedavg"))


def test_each_update_is_clipped_and_weighted_alike_and_divided_by_k():
    """Two updates of norms 5 and 0.5 (one clipped to 1), weights 9:1 ignored, K = 4, noise
    negligible: (u1 / 5 + u2) / 4, worked by hand; the integer counter is not aggregated."""
    s = dp(clip=1.0, z=1e-9, per_round=4)
    ups = [
        {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(7)},
        {"w": torch.tensor([0.3, 0.4]), "n": torch.tensor(2)},
    ]
    out = s.combine(ups, [9.0, 1.0])
    assert torch.allclose(out["w"], torch.tensor([0.9 / 4, 1.2 / 4]), atol=1e-7)
    assert int(out["n"]) == 0
    assert s.metrics()["privacy/clipped_fraction"] == 0.5


def test_the_noise_has_std_z_times_c_over_k_and_is_seeded_by_release():
    s = dp(clip=0.5, z=2.0, per_round=4)
    zero = [{"w": torch.zeros(200_000)}]
    first, second = s.combine(zero, [1.0])["w"], s.combine(zero, [1.0])["w"]
    assert float(first.std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.01)
    assert abs(float(first.mean())) < 5 * 0.25 / math.sqrt(200_000)
    assert not torch.equal(first, second)  # a new draw each release
    again = dp(clip=0.5, z=2.0, per_round=4)
    assert torch.equal(again.combine(zero, [1.0])["w"], first)  # the same from (seed, release)
    assert s.metrics()["privacy/noise_std"] == 1.0


ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]


def epsilon_full_participation(z: float, rounds: int, delta: float) -> float:
    """K = N: no sampling, the Gaussian mechanism of sensitivity 2C and std zC, whose RDP is
    alpha / (2 (z/2)^2) per round (Mironov 2017), turned into (eps, delta) by Proposition 12
    of Canonne, Kamath & Steinke 2020: rdp + log(1 - 1/a) - log(delta a) / (a - 1)."""
    sigma = z / 2
    return min(
        rounds * a / (2 * sigma**2) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
        for a in ORDERS
        if a > 1.01
    )


@pytest.mark.parametrize("z,rounds", [(4.0, 1), (4.0, 10), (10.0, 50)])
def test_epsilon_without_sampling_is_the_gaussian_rdp_worked_by_hand(z, rounds):
    assert eps(z, 10, 10, rounds) == pytest.approx(
        epsilon_full_participation(z, rounds, 1e-5), rel=1e-9
    )


def test_epsilon_with_sampling_is_dp_accountings_composed_round_by_round():
    """The same mechanism built here from dp-accounting's events, one round at a time, and
    the figure sampling must improve on (K = N)."""
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        100, 10, dp_accounting.GaussianDpEvent(1.5 / 2)
    )
    for r in range(1, 11):
        accountant.compose(event)
        assert eps(1.5, 100, 10, r) == pytest.approx(accountant.get_epsilon(1e-5))
    assert eps(1.5, 100, 10, 10) < epsilon_full_participation(1.5, 10, 1e-5)
    assert eps(1.5, 100, 10, 10) > eps(1.5, 100, 10, 5)


def test_a_dp_run_logs_epsilon_each_round_and_puts_it_in_the_summary(tmp_path):
    overrides = (*DP, "privacy.clip=0.5", "privacy.noise_multiplier=2.0", "fed.rounds=3")
    summary = run(make_cfg(tmp_path, *overrides))
    logged = [float(r["privacy/epsilon"]) for r in rows(tmp_path)]
    # digits: 20 clients, 10 a round
    assert logged == pytest.approx([eps(2.0, 20, 10, r) for r in (1, 2, 3)])
    assert summary["privacy_epsilon"] == logged[-1]
    assert json.loads((tmp_path / "summary.json").read_text())["privacy_epsilon"] == logged[-1]
    assert {float(r["privacy/noise_std"]) for r in rows(tmp_path)} == {1.0}
    assert all(0 <= float(r["privacy/clipped_fraction"]) <= 1 for r in rows(tmp_path))


@pytest.mark.parametrize("name", C.available())
def test_every_uplink_compressor_trains_under_dp(tmp_path, name):
    run(make_cfg(tmp_path, *DP, f"compressor={name}", "compressor.downlink=none", "fed.rounds=1"))
    (row,) = rows(tmp_path)
    assert float(row["privacy/epsilon"]) > 0 and math.isfinite(float(row["test/acc"]))


def test_max_epsilon_stops_at_the_last_round_within_it_checkpointed(tmp_path, capsys):
    budget = (eps(3.0, 20, 10, 3) + eps(3.0, 20, 10, 4)) / 2
    overrides = (*DP, "privacy.noise_multiplier=3.0", f"privacy.max_epsilon={budget}")
    summary = run(make_cfg(tmp_path, *overrides, "fed.rounds=8", "checkpoint.every=5"))
    assert len(rows(tmp_path)) == 3 and summary["rounds"] == 3
    assert checkpoint.load(tmp_path / "checkpoint.pt")["round"] == 3
    assert "privacy: stopped after 3 noisy rounds" in capsys.readouterr().out
    run(make_cfg(tmp_path, *overrides, "fed.rounds=8", "checkpoint.every=5"))  # resumed: no work
    assert len(rows(tmp_path)) == 3


def test_a_budget_that_one_round_exceeds_is_refused_before_any_work():
    cfg = compose([*DP, "privacy.max_epsilon=0.01"])
    with pytest.raises(ConfigError, match=r"privacy.max_epsilon=0.01: one round already costs"):
        validate(cfg)


def test_resume_keeps_the_accountant_and_the_noise_bitwise(tmp_path):
    overrides = (*DP, "strategy=fedavgm", "compressor=signsgd")
    run(make_cfg(tmp_path / "whole", *overrides, "fed.rounds=4"))
    run(make_cfg(tmp_path / "split", *overrides, "fed.rounds=2"))
    run(make_cfg(tmp_path / "split", *overrides, "fed.rounds=4"))
    assert_same_run(tmp_path / "whole", tmp_path / "split")
    assert (
        checkpoint.load(tmp_path / "split" / "checkpoint.pt")["server"]["strategy"]["released"] == 4
    )


@pytest.mark.parametrize("strategy", ["median", "trimmed_mean", "scaffold"])
def test_a_rule_whose_sensitivity_dp_cannot_bound_is_refused(strategy):
    with pytest.raises(ConfigError, match=f"privacy=dp with strategy={strategy}: its rule is not"):
        run_strategy(compose([*DP, f"strategy={strategy}"]))


@pytest.mark.parametrize(
    "override,match",
    [
        ("privacy.clip=0", r"privacy.clip=0"),
        ("privacy.noise_multiplier=-1", r"privacy.noise_multiplier=-1"),
        ("privacy.delta=2", r"privacy.delta=2"),
        ("+privacy.sigma=1", r"privacy.sigma: no such key; privacy=dp has: clip, clip_lr"),
    ],
)
def test_bad_privacy_values_are_one_line(override, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose([*DP, override]))


def test_adaptive_clipping_is_accounted_as_one_gaussian_of_multiplier_z_over_2():
    """Andrew et al.'s split: the update's and the count's Gaussians on one sample compose
    as a single Gaussian of multiplier z / 2: the same epsilon as fixed clipping at z."""
    auto = Privacy(clip="auto", noise_multiplier=1.0, count_noise=2.0)
    m = auto.update_multiplier(10)
    assert (m**-2 + 2.0**-2) ** -0.5 == pytest.approx(0.5)  # by hand: m = (4 - 1/4)^-1/2
    assert m == pytest.approx((4 - 0.25) ** -0.5)
    for rounds in (1, 7):
        assert epsilon(auto, 100, 10, rounds) == pytest.approx(eps(1.0, 100, 10, rounds), rel=1e-9)


def test_adaptive_clip_steps_geometrically_and_tracks_the_median_norm():
    """Ten updates of norms 1..10, count noise negligible: the first step is
    C0 exp(-eta (b - 1/2)) with b the fraction of norms <= C0, worked by hand; after many
    rounds C sits between the 5th and 6th norm (the median)."""
    settings = Privacy(clip="auto", noise_multiplier=1e-6, count_noise=1e-6, initial_clip=0.1)
    s = DPFedAvg(settings, seed=0, num_clients=100, per_round=10).wrap(dp().inner)
    ups = [{"w": torch.tensor([float(n), 0.0])} for n in range(1, 11)]
    s.combine(ups, [1.0] * 10)
    assert s.clip == pytest.approx(0.1 * math.exp(-0.2 * (0 - 0.5)), rel=1e-5)
    assert s.metrics()["privacy/clip"] == 0.1
    for _ in range(200):
        s.combine(ups, [1.0] * 10)
    assert 5.0 <= s.clip <= 6.0


def test_count_noise_that_leaves_the_update_no_budget_is_refused():
    with pytest.raises(ConfigError, match=r"privacy.count_noise=0.5: must exceed noise_mul"):
        validate(compose([*DP, "privacy.clip=auto", "privacy.noise_multiplier=1.0"]))


def test_an_adaptive_run_resumes_bitwise(tmp_path):
    overrides = (*DP, "privacy.clip=auto", "privacy.noise_multiplier=0.5", "fed.rounds=4")
    run(make_cfg(tmp_path / "whole", *overrides))
    run(make_cfg(tmp_path / "split", *overrides[:-1], "fed.rounds=2"))
    run(make_cfg(tmp_path / "split", *overrides))
    assert_same_run(tmp_path / "whole", tmp_path / "split")
    clips = [float(r["privacy/clip"]) for r in rows(tmp_path / "whole")]
    assert clips[0] == 0.1 and len(set(clips)) == 4  # C moved every round


def test_client_mode_clips_and_adds_each_clients_share_of_the_noise():
    settings = Privacy(clip=2.0, noise_multiplier=3.0, mode="client")
    s = DPFedAvg(settings, seed=0, num_clients=100, per_round=9).wrap(dp().inner)
    hook = s.client_hook(torch.nn.Linear(1, 1), {}, {}, {})
    torch.manual_seed(123)  # what train_client does for each (seed, round, client)
    big = {"w": torch.full((400_000,), 10.0), "n": torch.tensor(5)}
    out = hook.transform(big)
    clipped = 2.0 / math.sqrt(400_000) * 10 / 10  # every coordinate of the clipped update
    noise = out["w"].double() - clipped
    assert float(noise.std()) == pytest.approx(3.0 * 2.0 / 3, rel=0.01)  # z C / sqrt(K)
    assert int(out["n"]) == 0  # the step counter does not travel
    torch.manual_seed(123)
    assert torch.equal(hook.transform(big)["w"], out["w"])  # seeded by the client's round
    assert s.combine([{"w": torch.ones(2)}] * 9, [1.0] * 9)["w"].tolist() == [1.0, 1.0]


def test_client_mode_rounds_with_fewer_noisy_clients_cost_more():
    settings = Privacy(clip=1.0, noise_multiplier=2.0, mode="client")
    s = DPFedAvg(settings, seed=0, num_clients=100, per_round=4).wrap(dp().inner)
    s.combine([{"w": torch.ones(2)}] * 4, [1.0] * 4)
    s.combine([{"w": torch.ones(2)}] * 3, [1.0] * 3)
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for scale in (1.0, math.sqrt(3 / 4)):  # the round's noise: sqrt(m / K) of the full
        gaussian = dp_accounting.GaussianDpEvent(scale * 2.0 / 2)
        accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(100, 4, gaussian))
    assert s.metrics()["privacy/epsilon"] == pytest.approx(accountant.get_epsilon(1e-5))
    assert s.metrics()["privacy/epsilon"] > eps(2.0, 100, 4, 2)
    local = local_epsilon(settings, 4, 2)  # what the server sees of one client's update
    assert local == pytest.approx(epsilon_full_participation(2.0 / math.sqrt(4), 2, 1e-5))
    assert s.metrics()["privacy/epsilon_local"] == local


@pytest.mark.parametrize("compressor", ["none", "fedbat"])
def test_client_mode_trains_and_with_negligible_noise_equals_server_mode(tmp_path, compressor):
    """Clipping on the client before an exact uplink is clipping on the server after it."""
    common = (*DP, f"compressor={compressor}", "compressor.downlink=none", "fed.rounds=2")
    common += ("privacy.noise_multiplier=1e-9", "privacy.clip=0.3")
    run(make_cfg(tmp_path / "client", *common, "privacy.mode=client"))
    last = rows(tmp_path / "client")[-1]
    assert float(last["privacy/epsilon_local"]) > 0 and math.isfinite(float(last["test/acc"]))
    if compressor == "none":
        run(make_cfg(tmp_path / "server", *common))
        one = checkpoint.load(tmp_path / "client" / "checkpoint.pt")["server"]["global"]
        two = checkpoint.load(tmp_path / "server" / "checkpoint.pt")["server"]["global"]
        for k, v in one.items():
            assert torch.allclose(v.float(), two[k].float(), atol=1e-5), k


def test_client_mode_with_adaptive_clipping_is_refused():
    with pytest.raises(ConfigError, match=r"privacy.clip=auto with privacy.mode=client"):
        validate(compose([*DP, "privacy.clip=auto", "privacy.mode=client"]))
