"""Resume after SIGKILL, validated configs, untrusted packets, clean interrupts."""

import copy
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import fedbat.compressors as C
from fedbat import checkpoint, clientstore
from fedbat.assembly import build_datamodule, build_task
from fedbat.cli import main
from fedbat.compressors.packet import pack, unpack
from fedbat.lifecycle import run
from fedbat.server import Server
from fedbat.strategies import build as build_strategy
from tests.conftest import make_cfg
from tests.helpers import forge_raw, metric_rows, round_results, train_command

SLOW = ["model=cnn", "fed.local_epochs=4", "compressor=ef_signsgd"]  # ~0.3 s/round, with state


def wait_for_rows(run_dir: Path, n: int, proc: subprocess.Popen, limit: float = 120) -> None:
    end = time.time() + limit
    while time.time() < end and proc.poll() is None:
        if (run_dir / "metrics.csv").is_file() and len(metric_rows(run_dir)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} rounds: {proc.poll()} {proc.stderr and proc.stderr.read()}")


@pytest.mark.slow
def test_sigkill_mid_round_then_rerun_equals_uninterrupted(tmp_path):
    args = [*SLOW, "fed.rounds=10", "strategy=scaffold"]  # with every kind of state
    whole = tmp_path / "whole"
    run(make_cfg(whole, *args))  # uninterrupted, in this process
    broken = tmp_path / "broken"
    proc = subprocess.Popen(
        train_command(broken, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    wait_for_rows(broken, 3, proc)
    time.sleep(0.1)  # well inside a later round's local training
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = checkpoint.load(broken / "checkpoint.pt")["round"]
    assert 3 <= done < 10
    again = subprocess.run(train_command(broken, *args), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"resuming {broken} after round {done}" in again.stdout + again.stderr
    assert metric_rows(broken) == metric_rows(whole)
    a = checkpoint.load(whole / "checkpoint.pt")
    b = checkpoint.load(broken / "checkpoint.pt")
    for part in ("global", "held", "held_extra"):
        for k, v in a["server"][part].items():
            assert torch.equal(v, b["server"][part][k]), k
    for k, v in a["server"]["strategy"]["c"].items():
        assert torch.equal(v, b["server"]["strategy"]["c"][k]), k
    ka, kb = clientstore.read(whole, a), clientstore.read(broken, b)
    assert ka.keys() == kb.keys()
    assert any("/residual/" in k for k in ka) and any("/state/" in k for k in ka)
    assert all(torch.equal(v, kb[k]) for k, v in ka.items())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "code", "named"),
    [(signal.SIGTERM, 143, "(SIGTERM)"), (signal.SIGINT, 130, "(SIGINT)")],
)
def test_sigterm_and_ctrl_c_exit_nonzero_with_intact_checkpoint(tmp_path, sig, code, named):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        train_command(run_dir, *SLOW, "fed.rounds=200"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as in a terminal: a runner that ignores SIGINT would pass that on to the child
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_for_rows(run_dir, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code and f"interrupted {named}" in err and "Traceback" not in err
    state = checkpoint.load(run_dir / "checkpoint.pt")
    assert state["round"] >= 2 and len(metric_rows(run_dir)) >= state["round"]


@pytest.mark.slow
def test_sigusr1_finishes_the_round_checkpoints_and_stops(tmp_path):
    """SLURM's pre-emption signal, outside SLURM: the round in progress completes and is
    checkpointed (although checkpoint.every would not save it), exit 138."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    args = [*SLOW, "fed.rounds=200", "checkpoint.every=1000"]
    proc = subprocess.Popen(
        train_command(run_dir, *args), stderr=subprocess.PIPE, text=True, env=env
    )
    wait_for_rows(run_dir, 2, proc)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    done = checkpoint.load(run_dir / "checkpoint.pt")["round"]
    assert proc.returncode == 138, err
    assert f"SIGUSR1: stopped after round {done}, checkpointed; not a SLURM job" in err
    assert done == len(metric_rows(run_dir)) >= 2 and "Traceback" not in err
    # resuming from it, across SLURM requeues, is tests/test_slurm.py's


def test_resume_refuses_a_different_run(tmp_path):
    run(make_cfg(tmp_path, "fed.rounds=2"))
    with pytest.raises(Exception, match=r"fed\.lr=0\.05.*written with fed\.lr=0\.1"):
        run(make_cfg(tmp_path, "fed.rounds=3", "fed.lr=0.05"))
    extended = run(make_cfg(tmp_path, "fed.rounds=4"))  # more rounds of the same run is fine
    assert extended["rounds"] == 4
    assert extended == run(make_cfg(tmp_path / "fresh", "fed.rounds=4"))


BAD_CONFIGS = [
    (["compressor=zip"], "compressor=zip: unknown compressor option; available: bf16, drive"),
    (["data.name=imagenet"], "data.name='imagenet'"),
    (["model.name=vgg"], "model.name='vgg'"),
    (["data.partition=shards"], "data.partition='shards'"),
    (["logger=slack"], "logger=slack: unknown logger option; available: csv, wandb"),
    (["compressor=topk", "compressor.ratio=1.5"], "compressor.ratio=1.5"),
    (["compressor=topk", "compressor.ratio=0"], "compressor.ratio=0"),
    (["compressor=qsgd", "compressor.levels=0"], "compressor.levels=0"),
    (["compressor=fedbat", "compressor.rho=-1"], "compressor.rho=-1"),
    (["compressor=fedbat", "compressor.phi=1.5"], "compressor.phi=1.5"),
    (["compressor.downlink=nope"], "compressor.downlink='nope'"),
    (["fed.lr=0"], "fed.lr=0"),
    (["fed.lr=-0.1"], "fed.lr=-0.1"),
    (["fed.rounds=0"], "fed.rounds=0"),
    (["fed.rounds=abc"], "fed.rounds='abc'"),
    (["fed.clients_per_round=50"], "fed.clients_per_round=50"),
    (["data.alpha=0"], "data.alpha=0"),
    (["data.alpha=-1"], "data.alpha=-1"),
    (["fed.batch_size=0"], "fed.batch_size=0"),
    (["fed.local_epochs=1.5"], "fed.local_epochs=1.5"),
    (["fed.momentum=1.5"], "fed.momentum=1.5"),
    (["trainer.precision=8"], "trainer.precision='8'"),
    (["fed.roundz=3"], "fed.roundz=3: no such key; fed has: rounds,"),
    (["resume=/nonexistent/ckpt.pt"], "resume='/nonexistent/ckpt.pt'"),
    (["logger=wandb", "logger.wandb.mode=sometimes"], "logger.wandb.mode='sometimes'"),
    (["data.partition=label_count", "data.classes_per_client=11"], "classes_per_client=11"),
    (["data=cifar10", "data.root=/nonexistent"], "cifar10"),
]


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    run_dir = tmp_path_factory.mktemp("existing")
    run(make_cfg(run_dir, "fed.rounds=1"))
    return run_dir, {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


@pytest.mark.parametrize("overrides,needle", BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_bad_config_one_line_exit_2_run_dir_untouched(overrides, needle, existing_run, capsys):
    run_dir, before = existing_run
    code = main(["train", f"hydra.run.dir={run_dir}", "progress=false", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def _flip(data: bytes, index: int) -> bytes:
    b = bytearray(data)
    b[index] ^= 0xFF
    return bytes(b)


def test_fuzzed_packets_rejected_round_completes(tmp_path):
    server, results = round_results(tmp_path, 6)
    good = results[0].data
    header = int.from_bytes(good[:8], "little")
    fields = unpack(good, server.plan, server.uplink)
    raw = next(s.name for s in server.plan if not s.compressed and s.dtype == torch.float32)
    fields[raw]["raw"] = fields[raw]["raw"].clone()
    fields[raw]["raw"][0] = float("nan")
    nan_packet = pack(fields, server.uplink).data
    corrupt = {
        1: good[: len(good) // 3],  # truncated
        2: _flip(good, 8 + header // 2),  # bit-flipped header
        3: nan_packet,  # NaN value in an fp32 tensor
        4: good + bytes(10_000_000),  # oversized
        5: b"\x00" * 64,  # garbage
    }
    for i, data in corrupt.items():
        results[i].data = data
    before = server.global_state()
    agg = server.aggregate(results, {r.client for r in results})
    assert agg.accepted == [results[0].client]
    assert sorted(agg.rejected) == sorted(results[i].client for i in corrupt)
    state = server.global_state()
    assert all(bool(torch.isfinite(v.float()).all()) for v in state.values())
    assert any(not torch.equal(state[k], before[k]) for k in state)  # the good client counted


def test_random_bit_flips_never_make_global_non_finite(tmp_path):
    server, results = round_results(tmp_path, 2)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        data = bytearray(results[0].data)
        for i in torch.randint(0, len(data), (3,), generator=g).tolist():
            data[i] ^= 1 << int(torch.randint(0, 8, (1,), generator=g))
        results[1].data = bytes(data)
        server.aggregate(results, {r.client for r in results})
        assert all(bool(torch.isfinite(v.float()).all()) for v in server.global_state().values())


def test_wrong_shape_packet_rejected(tmp_path):
    server, results = round_results(tmp_path, 2)
    other = C.wire_plan(
        build_task(make_cfg(tmp_path, "model=mlp"), build_datamodule(make_cfg(tmp_path)))
    )
    update = {s.name: torch.zeros(s.shape, dtype=s.dtype) for s in other}
    results[1].data = C.encode_update(update, other, server.uplink, torch.Generator()).data
    agg = server.aggregate(results, {r.client for r in results})
    assert list(agg.rejected) == [results[1].client]


def test_nan_local_loss_is_rejected_and_model_stays_finite(tmp_path):
    summary = run(
        make_cfg(tmp_path, "fed.lr=100", "fed.rounds=2", "model=cnn", "fed.local_epochs=3")
    )
    rows = metric_rows(tmp_path)
    assert float(rows[-1]["clients/rejected"]) > 0
    state = checkpoint.load(tmp_path / "checkpoint.pt")["server"]["global"]
    assert all(bool(torch.isfinite(v.float()).all()) for v in state.values())
    assert summary["rounds"] == 2


def test_checkpoint_loads_weights_only(tmp_path):
    run(make_cfg(tmp_path, "compressor=ef_signsgd", "fed.rounds=1"))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["round"] == 1 and int(state["clients"]["index"].max()) == 0
    assert not list(tmp_path.glob("*.tmp"))
    os.remove(tmp_path / "checkpoint.pt")


def _forge_scale(data: bytes, server: Server, scale: float) -> bytes:
    """A client's real FedBAT packet with every step size replaced by ``scale`` (finite)."""
    fields = unpack(data, server.plan, server.uplink)
    for spec in server.plan:
        if spec.compressed:
            fields[spec.name]["scale"] = torch.tensor([scale])
    return pack(fields, server.uplink).data


@pytest.mark.parametrize("value", [1e30, 3e38])
def test_one_huge_but_finite_update_costs_only_its_own_client(tmp_path, value):
    server, results = round_results(tmp_path, 4)
    results[2].data, _ = forge_raw(results[2].data, server, value)
    before = server.global_state()
    agg = server.aggregate(results, {r.client for r in results})
    assert list(agg.rejected) == [results[2].client]
    assert "max_update_ratio" in agg.rejected[results[2].client]
    assert agg.accepted == [results[i].client for i in (0, 1, 3)]
    state = server.global_state()
    assert max(float(v.abs().max()) for v in state.values() if v.is_floating_point()) < 10
    assert any(not torch.equal(state[k], before[k]) for k in state)  # honest work applied


@pytest.mark.parametrize("scale", [0.25, 1e-5, 0.0])
def test_a_forged_fedbat_step_size_inside_the_norm_bound_is_rejected(tmp_path, scale):
    """Honest clients clamp their step sizes to [5e-4, 5e-2]; 5x that (0.25) stays far
    inside the default norm bound, yet is refused, as is one below the range."""
    server, results = round_results(tmp_path, 3)
    results[1].data = _forge_scale(results[1].data, server, scale)
    agg = server.aggregate(results, {r.client for r in results})
    assert agg.accepted == [results[0].client, results[2].client]  # honest scales pass
    assert "outside [0.0005, 0.05]" in agg.rejected[results[1].client]


def test_a_replayed_or_unsampled_result_is_rejected(tmp_path):
    """A transport that delivers one client's result twice, or a client that was not
    sampled: neither counts; the other clients do."""
    server, results = round_results(tmp_path, 3)
    replayed = [results[0], results[1], copy.copy(results[1]), results[2]]
    agg = server.aggregate(replayed, {0, 1, 2})
    assert agg.accepted == [0, 2] and "2 results in one round" in agg.rejected[1]
    agg = server.aggregate(results, {0, 1})
    assert agg.accepted == [0, 1] and agg.rejected == {2: "not sampled in this round"}


def test_rollback_restores_the_strategy_state_too(tmp_path):
    """FedAdam with the norm bound off: one 3e38 value makes the second moment infinite
    while the model stays finite (its step is m / inf = 0). The rollback covers the
    strategy's state, so that layer keeps training in the next honest round."""
    server, results = round_results(tmp_path, 3)
    server.max_update_ratio = None
    server.strategy = build_strategy("fedadam")
    server.strategy.setup(server.params)
    assert server.aggregate(results, {0, 1, 2}).accepted  # honest: fills m and v
    before = copy.deepcopy(server.strategy.state_dict()), server.global_state()
    poisoned = list(results)
    poisoned[0] = copy.copy(results[0])
    poisoned[0].data, name = forge_raw(results[0].data, server, 3e38)
    agg = server.aggregate(poisoned, {0, 1, 2})
    assert not agg.accepted and set(agg.rejected.values()) == {"the aggregate overflowed"}
    for part in ("m", "v"):
        for k, v in before[0][part].items():
            assert torch.equal(server.strategy.state_dict()[part][k], v), (part, k)
    assert server.aggregate(results, {0, 1, 2}).accepted == [0, 1, 2]
    assert not torch.equal(server.global_state()[name], before[1][name])  # still trains


def test_empty_packet_is_not_called_non_finite_training(tmp_path):
    server, results = round_results(tmp_path, 2)
    results[1].data = b""
    assert server.aggregate(results, {r.client for r in results}).rejected == {
        results[1].client: "empty packet"
    }
