"""Strategy wrappers and the update-transform point, checked against hand computations."""

import subprocess
import sys

import pytest
import torch

import fedbat.compressors as C
from fedbat.client import ClientJob, train_client
from fedbat.compressors.fedbat import FedBAT, binarize
from fedbat.errors import ConfigError
from fedbat.hooks import check_transform_point
from fedbat.lifecycle import run
from fedbat.strategies import WRAPPERS, build
from fedbat.strategies.wrappers import clip
from tests.conftest import make_cfg
from tests.helpers import components, round_results


def norm(update: dict[str, torch.Tensor]) -> float:
    floats = [v for v in update.values() if v.is_floating_point()]  # not BN's step counter
    return float(sum(v.double().square().sum() for v in floats) ** 0.5)


def test_server_clip_by_hand():
    """Two updates of norms 5 and 0.5, bound 1: the rule gets u1 / 5 and u2 unchanged."""
    s = build({"name": "fedavg", "wrap": [{"name": "clip", "max_norm": 1.0}]})
    ups = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.3, 0.4])}]
    mean = s.combine(ups, [1.0, 3.0])
    want = (torch.tensor([0.6, 0.8]) + 3 * torch.tensor([0.3, 0.4])) / 4
    assert torch.allclose(mean["w"], want, atol=1e-7)
    assert s.metrics() == {"clip/clipped_fraction": 0.5}


def test_server_clip_reaches_the_rule_in_a_real_round(tmp_path):
    server, results = round_results(tmp_path, 3)
    ups = [C.decode_update(r.data, server.plan, server.uplink)[0] for r in results]
    bound = sorted(norm(u) for u in ups)[1]  # the middle one: one clipped, two kept
    strategy = build({"name": "fedavg", "wrap": [{"name": "clip", "max_norm": bound}]})
    strategy.setup(server.params, 3)
    server.strategy = strategy
    seen = {}
    strategy.inner.apply = lambda delta: seen.update(delta)
    agg = server.aggregate(results, {r.client for r in results})
    n = [r.num_samples for r in results]
    scaled = [min(1.0, bound / norm(u)) for u in ups]
    for name in server.params:
        want = sum(u[name].double() * w * f for u, w, f in zip(ups, n, scaled, strict=True))
        assert torch.allclose(seen[name].double(), want / sum(n), atol=1e-7), name
    assert agg.logs["clip/clipped_fraction"] == pytest.approx(1 / 3)


def _setup(tmp_path, compressor: str, wrap: str) -> tuple:
    parts = components(tmp_path, f"compressor={compressor}", "compressor.downlink=none",
                       "model=cnn", f"strategy.wrap={wrap}")  # fmt: skip
    return parts.setup, parts.server()


def test_client_clip_sends_an_update_of_norm_at_most_the_bound(tmp_path):
    setup, server = _setup(tmp_path, "none", "[{name: clip, max_norm: 1e-3, side: client}]")
    res = train_client(setup, ClientJob(client=0, round=0, held=server.held))
    sent, _ = C.decode_update(res.data, server.plan, setup.uplink)
    assert norm(sent) == pytest.approx(1e-3, rel=1e-5)  # the trained update is far larger


def test_a_transform_reaches_fedbat_before_its_final_draw(tmp_path):
    """Unclipped (a bound no update reaches) the packets are those without a wrapper, bit
    for bit; clipped, the sent signs are the draw of S(clip(m), alpha) by the paper's formula."""
    packets = {}
    for label, wrap in [("plain", "[]"), ("loose", "[{name: clip, max_norm: 1e9, side: client}]")]:
        setup, server = _setup(tmp_path / label, "fedbat", wrap)
        packets[label] = train_client(setup, ClientJob(client=0, round=0, held=server.held)).data
    assert packets["plain"] == packets["loose"]

    setup, server = _setup(tmp_path / "hook", "fedbat", "[]")
    names = [s.name for s in server.plan if s.compressed]
    hook = setup.uplink.training_hook(setup.task, names, 4)
    opt = torch.optim.SGD([p for p in setup.task.parameters() if p.requires_grad], lr=0.1)
    batch = next(setup.data.client_batches(0, 32, torch.Generator(), "cpu"))
    for step in range(4):
        opt.zero_grad()
        setup.task.training_step(batch, 0).backward()
        opt.step()
        hook.after_step(step)
    latent = hook.latent()
    clipped, scaled = clip(latent, 1e-3)
    assert scaled
    torch.manual_seed(7)
    fields = hook.encode_latent(clipped)
    torch.manual_seed(7)
    for name in names:
        alpha = fields[name]["scale"]
        b = binarize(clipped[name], alpha, torch.rand_like(clipped[name]))
        assert torch.equal(C.build("fedbat").decode(fields[name], b.shape), alpha * (2 * b - 1))


class OpaqueLearner(FedBAT):
    """A compressor that encodes during training and hands nothing to transforms."""

    offers_latent = False


def test_a_transform_beside_an_opaque_learner_is_refused_in_one_line():
    client_clip = build({"name": "fedavg", "wrap": [{"name": "clip", "side": "client"}]})
    with pytest.raises(ConfigError, match=r"^compressor=\?: it encodes during local training"):
        check_transform_point(OpaqueLearner(), client_clip)
    check_transform_point(OpaqueLearner(), build({"name": "fedavg", "wrap": ["clip"]}))
    check_transform_point(C.build("fedbat"), client_clip)


def test_bad_wrappers_fail_in_one_line(tmp_path):
    for arg, why in [
        ("strategy.wrap=[noise]", "strategy.wrap[0]='noise': unknown strategy wrapper"),
        ("strategy.wrap=[{name:clip,max_norm:-1}]", "strategy.wrap[0].max_norm=-1"),
        ("strategy.wrap=[{name:clip,side:both}]", "strategy.wrap[0].side='both'"),
        ("strategy.wrap=clip", "strategy.wrap='clip': must be a list"),
    ]:
        out = subprocess.run(
            [sys.executable, "-m", "fedbat.cli", "train", arg, f"run_dir={tmp_path}/x"],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 2, (arg, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert out.stderr.startswith(f"fedbat: error: {why}"), (arg, out.stderr)
    assert not (tmp_path / "x").exists()
    assert WRAPPERS.available() == ["clip"]


def test_a_clipped_run_trains_and_logs_its_clipped_fraction(tmp_path):
    wrap = "strategy.wrap=[{name:clip,max_norm:0.5}]"
    summary = run(make_cfg(tmp_path, "compressor=fedbat", wrap, "fed.rounds=2"))
    assert summary["rounds"] == 2
    from tests.helpers import rows

    fractions = [float(r["clip/clipped_fraction"]) for r in rows(tmp_path)]
    assert all(0.0 <= f <= 1.0 for f in fractions) and len(fractions) == 2
