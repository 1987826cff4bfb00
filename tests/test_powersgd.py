"""PowerSGD checked against linear algebra, apart from its own code (a rank <= r matrix comes
back exactly; warm-started rounds on one matrix reach the Eckart-Young optimum, never beat
it), and the generic compressor state it keeps: per client in the client store, the
downlink's in the server checkpoint, resumed bitwise."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import fedbat.compressors as C
from fedbat import checkpoint, clientstore
from fedbat.errors import ConfigError, PacketError
from fedbat.lifecycle import run
from tests.conftest import make_cfg
from tests.helpers import assert_same_run, components


def low_rank(n: int, m: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) @ torch.randn(k, m, generator=g)


@pytest.mark.parametrize("k,rank", [(1, 1), (2, 2), (2, 4), (3, 8)])
def test_a_matrix_of_rank_at_most_r_comes_back_exactly(k, rank):
    m = low_rank(64, 288, k).reshape(64, 32, 3, 3)  # a conv weight, seen as 64 x 288
    y = C.roundtrip({"name": "powersgd", "rank": rank}, m)
    assert float((y - m).norm() / m.norm()) < 1e-3  # fp32 rounding (MQ may be ill-conditioned)
    assert optimum(m.reshape(64, -1), rank) < 1e-10  # the matrix is of rank <= r indeed


def test_the_payload_is_r_times_n_plus_m_fp32_values():
    plan = [C.TensorSpec("w", torch.Size([64, 32, 3, 3]), torch.float32, True)]
    comp = C.build({"name": "powersgd", "rank": 3})
    packet = C.encode_update({"w": low_rank(64, 288, 5)}, plan, comp, torch.Generator())
    assert packet.payload_bits == 32 * 3 * (64 + 288)
    assert comp.max_payload_bytes((64, 32, 3, 3)) * 8 == packet.payload_bits
    assert comp.factors((10, 3)) == (10, 3, 3)  # r = min(rank, n, m)


def optimum(x: torch.Tensor, r: int) -> float:
    """Eckart-Young: the least ||M - M_r||^2 / ||M||^2 of any rank-r M_r."""
    s = torch.linalg.svdvals(x.double()).square()
    return float(s[r:].sum() / s.sum())


@pytest.mark.parametrize("source", ["gaussian", "cnn4"])
def test_warm_started_rounds_reach_the_best_rank_r_approximation(source, request):
    """The same matrix sent round after round through one sender's memory: each round is a
    power-iteration step from the kept Q, so the error falls to the SVD's optimum; no round
    can beat it."""
    if source == "cnn4":
        x = request.getfixturevalue("cnn4_update").reshape(256, 1152)
    else:  # a spectrum with a gap after r, as updates have
        x = low_rank(256, 1152, 4, seed=1) + 0.05 * torch.randn(256, 1152)
    r = 4
    plan = [C.TensorSpec("w", x.shape, torch.float32, True)]
    comp = C.build({"name": "powersgd", "rank": r, "error_feedback": False})
    memory, errors = C.Memory(), []
    for i in range(40):
        gen = torch.Generator().manual_seed(i)  # only the first round draws Q
        packet = C.encode_update({"w": x}, plan, comp, gen, memory, holder=3)
        y = C.decode_update(packet.data, plan, comp)[0]["w"]
        errors.append(float((y - x).double().square().sum() / x.double().square().sum()))
    best = optimum(x, r)
    assert min(errors) >= best * (1 - 1e-4)
    assert errors[-1] == pytest.approx(best, rel=0.02)
    assert errors[-1] < errors[0]
    assert set(memory.state_of(3)) == {"w/q"} and memory.state_of(3)["w/q"].shape == (1152, r)


@pytest.mark.parametrize("rank", [0, -1, 1.5, True, "2"])
def test_a_bad_rank_is_one_line(rank):
    with pytest.raises(ConfigError, match=f"rank={rank!r}: must be an integer >= 1"):
        C.build({"name": "powersgd", "rank": rank})


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("p", torch.zeros(5), r"field 'p': shape \(5,\), expected \(128,\)"),
        ("q", torch.full((36,), math.nan), "field 'q': non-finite values"),
        ("p", torch.full((128,), 1e30), "factors whose product overflows"),
        ("q", torch.zeros(36, dtype=torch.float16), "field 'q': dtype torch.float16"),
    ],
)
def test_hostile_fields_are_refused(field, value, match):
    comp = C.build({"name": "powersgd", "rank": 2})
    x = low_rank(64, 18, 2).reshape(64, 2, 3, 3)
    fields, _ = comp.encode(x, torch.Generator(), state={})
    fields[field] = value
    fields["q"] = fields["q"] if field != "p" else torch.full((36,), 1e30)
    with pytest.raises(PacketError, match=match):
        comp.decode(fields, x.shape)


BOTH = ("compressor=powersgd", "compressor.rank=2", "trainer.threads=1")


def test_the_client_state_template_names_each_q(tmp_path):
    parts = components(tmp_path, *BOTH)
    kept = {k: v for k, v in parts.state_template().items() if k.startswith("compressor/")}
    compressed = [s for s in parts.plan if s.compressed]
    assert kept == {
        f"compressor/{s.name}/q": (torch.Size([math.prod(s.shape[1:]), 2]), torch.float32)
        for s in compressed
    }


def test_compressor_state_is_stored_per_client_and_resumes_bitwise(tmp_path):
    """PowerSGD on both links: every trained client's Q in its store file, the server's Q in
    the checkpoint; a run stopped after round 2 and resumed equals one run of 4 rounds, which
    it could not if either Q restarted (a fresh draw of the initial Q)."""
    run(make_cfg(tmp_path / "whole", *BOTH, "fed.rounds=4"))
    run(make_cfg(tmp_path / "split", *BOTH, "fed.rounds=2"))
    run(make_cfg(tmp_path / "split", *BOTH, "fed.rounds=4"))
    assert_same_run(tmp_path / "whole", tmp_path / "split")
    state = checkpoint.load(tmp_path / "whole" / "checkpoint.pt")
    kept = clientstore.read(tmp_path / "whole", state)
    assert {k.split("/")[1] for k in kept} == {"residual", "compressor"}
    assert all(k.startswith("server/") and k.endswith("/q") for k in state["server"]["compressor"])
    assert state["server"]["compressor"] and state["server"]["memory"]  # Q and residuals


def test_a_restarted_q_changes_the_run(tmp_path):
    """The warm start matters: the same resumed run with the clients' stored Q removed (each
    client then draws a fresh Q) trains differently."""
    run(make_cfg(tmp_path / "a", *BOTH, "fed.rounds=2"))
    run(make_cfg(tmp_path / "b", *BOTH, "fed.rounds=2"))
    for f in (tmp_path / "b" / "clients").glob("*.safetensors"):
        tensors = load_file(f)
        save_file({k: v for k, v in tensors.items() if "/q" not in k}, f)
    run(make_cfg(tmp_path / "a", *BOTH, "fed.rounds=3"))
    run(make_cfg(tmp_path / "b", *BOTH, "fed.rounds=3"))
    one = checkpoint.load(tmp_path / "a" / "checkpoint.pt")["server"]["global"]
    two = checkpoint.load(tmp_path / "b" / "checkpoint.pt")["server"]["global"]
    assert any(not torch.equal(v, two[k]) for k, v in one.items())
