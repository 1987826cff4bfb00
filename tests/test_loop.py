import pytest
import torch

import fedbat.compressors as C
from fedbat import checkpoint
from fedbat.assembly import build_datamodule, build_task
from fedbat.lifecycle import run
from fedbat.seeding import sample_clients
from tests.conftest import make_cfg
from tests.helpers import rows, stable


def test_digits_loss_falls_and_accuracy_rises(tmp_path):
    summary = run(make_cfg(tmp_path, "fed.rounds=6"))
    r = rows(tmp_path)
    assert len(r) == 6
    acc = [float(x["test/acc"]) for x in r]
    loss = [float(x["train/loss"]) for x in r]
    assert loss[-1] < loss[0] * 0.6 and acc[-1] > acc[0] + 0.1 and acc[-1] > 0.85
    assert summary["final_acc"] == pytest.approx(acc[-1])
    for key in (
        "round",
        "test/acc",
        "test/loss",
        "train/loss",
        "bits/uplink",
        "bits/downlink",
        "bits/uplink_cum",
        "bits/downlink_cum",
        "time/round_s",
    ):
        assert key in r[0]


def test_same_seed_same_metrics_and_weights(tmp_path):
    a = run(make_cfg(tmp_path / "a", "compressor=qsgd"))
    b = run(make_cfg(tmp_path / "b", "compressor=qsgd"))
    assert a == b
    ha = checkpoint.load(tmp_path / "a" / "checkpoint.pt")
    hb = checkpoint.load(tmp_path / "b" / "checkpoint.pt")
    assert stable(ha["history"]) == stable(hb["history"])
    for k, v in ha["server"]["global"].items():
        assert torch.equal(v, hb["server"]["global"][k])
    c = run(make_cfg(tmp_path / "c", "compressor=qsgd", "seed=1"))
    assert c != a


@pytest.mark.parametrize("name", C.available())
@pytest.mark.parametrize("direction", ["uplink", "downlink"])
def test_every_compressor_trains_digits_and_bits_are_packet_bytes(tmp_path, name, direction):
    other = "downlink" if direction == "uplink" else "uplink"
    cfg = make_cfg(tmp_path, f"compressor={name}", f"compressor.{other}=none", "fed.rounds=4")
    summary = run(cfg)
    assert summary["best_acc"] > 0.3, summary  # 3x chance in 4 rounds, even top-1%
    # the logged bits equal the real bytes of packets of this layout (sizes are data-independent)
    task = build_task(cfg, build_datamodule(cfg))
    plan = C.wire_plan(task, cfg.policy.min_numel)
    comp = C.build(name)
    update = {k: torch.randn(v.shape).to(v.dtype) for k, v in task.state_dict().items()}
    size = C.encode_update(update, plan, comp, torch.Generator().manual_seed(0)).bits
    fp32 = C.encode_update(update, plan, C.build("none"), torch.Generator()).bits
    up, down = (size, fp32) if direction == "uplink" else (fp32, size)
    # each sampled client is sent the broadcasts it missed, or the full model when no smaller
    held: dict[int, int] = {}
    for r, row in enumerate(rows(tmp_path)):
        sent = 0
        for c in sample_clients(cfg.seed, r, cfg.data.num_clients, cfg.fed.clients_per_round):
            missed = r - held[c] if c in held else None
            sent += fp32 if missed is None or missed * down >= fp32 else missed * down
            held[c] = r
        assert int(float(row["bits/downlink"])) == sent, r
        assert int(float(row["bits/uplink"])) == 10 * up
    assert int(float(row["bits/uplink_cum"])) == 4 * 10 * up
    if direction == "uplink":  # fp32 down: the full model to every sampled client
        assert int(float(row["bits/downlink_cum"])) == 4 * 10 * fp32


def test_bf16_mixed_precision_trains_and_packets_stay_fp32(tmp_path):
    """Autocast wraps local training only: FedBAT still learns, the wire format is unchanged."""
    args = ("compressor=fedbat", "compressor.downlink=none", "fed.rounds=4")
    mixed = run(make_cfg(tmp_path / "bf16", *args, "trainer.precision=bf16-mixed"))
    full = run(make_cfg(tmp_path / "fp32", *args))
    assert mixed["best_acc"] > 0.4, mixed
    assert mixed["bits_uplink_total"] == full["bits_uplink_total"]
    weights = checkpoint.load(tmp_path / "bf16" / "checkpoint.pt")["server"]["global"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in weights.values())


def test_qsgd_deflate_trains_identically_on_fewer_bits(tmp_path):
    """Entropy coding is lossless: the same accuracies round by round, fewer uplink bits."""
    args = ("compressor=qsgd", "compressor.downlink=none")
    fixed = run(make_cfg(tmp_path / "fixed", *args))
    deflate = run(make_cfg(tmp_path / "deflate", *args, "compressor.coding=deflate"))
    accs = [[r["test/acc"] for r in rows(tmp_path / d)] for d in ("fixed", "deflate")]
    assert accs[0] == accs[1]
    assert deflate["bits_uplink_total"] < 0.8 * fixed["bits_uplink_total"], (deflate, fixed)
