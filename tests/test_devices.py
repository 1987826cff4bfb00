"""Simulated devices on one virtual clock (``fedbat/devices.py``): every figure checked
against a hand-worked timeline, then through real runs whose bits set the clock."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import wandb

from fedbat import checkpoint
from fedbat.assembly import build_datamodule
from fedbat.cli import main
from fedbat.devices import Clock, Devices, Profile
from fedbat.lifecycle import run
from fedbat.seeding import derive_seed, sample_clients
from tests.conftest import make_cfg
from tests.wandb_records import read_run

# Three devices with 50 ms latency, 10 Mbit/s down, 1 Mbit/s up, 0.01/0.02/0.1 s a sample.
# Each is sent 1 Mbit (0.1 s), trains 100 samples and sends 0.1 Mbit (0.1 s) back: it has
# the model at 0.15 s, is done computing at 1.15 / 2.15 / 10.15 s and uploading at
# 1.30 / 2.30 / 10.30 s.
SPEEDS = (0.01, 0.02, 0.1)
DOWN, UP, SAMPLES = dict.fromkeys(range(3), 10**6), dict.fromkeys(range(3), 10**5), 100


def devices(intervals=None) -> Devices:
    return Devices(3, lambda c: Profile(SPEEDS[c], 1e6, 1e7, 0.05), intervals)


def play(clock: Clock, keep: int = 3):
    line = clock.begin(0.0, DOWN, dict.fromkeys(range(3), SAMPLES))
    return line, clock.end(line, {c: UP[c] for c in line.train}, keep)


def test_wait_for_all_ends_with_the_slowest_device():
    line, out = play(Clock(devices()))
    assert line.train == [0, 1, 2] and line.computed == pytest.approx({0: 1.15, 1: 2.15, 2: 10.15})
    assert out.kept == {0, 1, 2} and (out.dropped, out.late) == (0, 0)
    assert out.end == pytest.approx(10.30)


def test_a_deadline_drops_the_straggler_before_it_trains():
    clock = Clock(devices(), deadline_s=5.0)
    line, out = play(clock)
    assert line.train == [0, 1] and line.gone == {2: "late"}  # computing until 10.15 s
    assert out.kept == {0, 1} and (out.dropped, out.late) == (0, 1)
    assert out.end == clock.now == 5.0  # the server waited until the deadline
    # a deadline between the end of computing and the end of uploading: trained, then late
    line, out = play(Clock(devices(), deadline_s=2.2))
    assert 1 in line.train and out.kept == {0} and out.late == 2 and out.end == 2.2


def test_over_selection_keeps_the_first_k_to_finish():
    clock = Clock(devices(), over_select=1.5)
    assert clock.sample(0, 0, 2)[1] == [0, 1, 2]  # ceil(2 x 1.5) of 3 contacted
    _, out = play(clock, keep=2)
    assert out.kept == {0, 1} and out.late == 1
    assert out.end == pytest.approx(2.30)  # the second arrival ends the round


def test_devices_that_go_offline_drop_out():
    # 0 leaves while downloading (what it holds is unknown), 1 while computing, 2 while uploading
    clock = Clock(devices({0: [(0.0, 0.1)], 1: [(0.0, 2.0)], 2: [(0.0, 10.2)]}))
    line, out = play(clock)
    assert line.gone == {0: "dropped", 1: "dropped"} and line.unknown == {0}
    assert line.train == [2] and out.kept == set() and out.dropped == 3
    assert out.end == pytest.approx(10.2)  # the server noticed the last one leave


def test_a_round_starts_when_a_device_comes_online():
    clock = Clock(devices({0: [(5.0, 9.0)], 1: [(7.0, 8.0)], 2: [(20.0, 30.0)]}))
    assert clock.sample(0, 0, 2) == (5.0, [0])  # only client 0 is online at 5 s
    clock.now = 8.5
    assert clock.sample(0, 0, 2) == (8.5, [0])
    clock.now = 9.0  # an interval holds its start, not its end
    assert clock.sample(0, 0, 3) == (20.0, [2])
    clock.now = 30.0
    assert clock.first_online() is None


def test_without_availability_or_over_selection_the_draw_is_the_plain_one():
    clock = Clock(Devices(100, lambda c: Profile(0.0, 1.0, 1.0, 0.0)))
    for r in range(20):
        assert clock.sample(7, r, 10) == (0.0, sample_clients(7, r, 100, 10))


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def rows(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "metrics.csv") as f:
        return [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]


def test_a_trace_sets_each_clients_time_from_its_real_bytes(tmp_path):
    """A 20-client trace (client c: (c + 1) / 5 ms a sample, 1 Mbit/s up, 10 down, 20 ms) and an
    availability table (client 3 online only from 1000 s); a 0.3 s deadline. Round 1's
    clock, by hand from the round's real bits and each client's real sample count."""
    trace = write_csv(
        tmp_path / "trace.csv",
        "client,compute_s_per_sample,uplink_mbps,downlink_mbps,latency_ms",
        [f"{c},{(c + 1) / 5000},1,10,20" for c in range(20)],
    )
    avail = write_csv(tmp_path / "avail.csv", "client,start_s,end_s", ["3,1000,inf"])
    system = [f"system.trace={trace}", f"system.availability={avail}", "system.deadline_s=0.3"]
    job = ["compressor=fedbat", "compressor.downlink=none", "fed.rounds=2", "target_acc=0.1"]
    cfg = make_cfg(tmp_path / "run", *job, *system, "logger=wandb")
    summary = run(cfg)
    wandb.teardown()
    first = rows(tmp_path / "run")[0]
    dm, epochs = build_datamodule(cfg), cfg.fed.local_epochs
    online = [c for c in range(20) if c != 3]  # 10 drawn among the 19 online
    rng = np.random.default_rng(derive_seed(0, 0))
    contacted = sorted(online[int(i)] for i in rng.choice(19, 10, replace=False))
    down = first["bits/downlink"] / 10  # the full model to each
    up = first["bits/uplink"] / first["clients/accepted"]  # fixed-size 1-bit packets
    finish = {
        c: 0.02 + down / 10e6 + (c + 1) / 5000 * epochs * dm.client_size(c) + 0.02 + up / 1e6
        for c in contacted
    }
    on_time = [t for t in finish.values() if t <= 0.3]
    assert 0 < len(on_time) < 10  # the trace makes some clients stragglers
    assert first["clients/accepted"] == len(on_time)
    assert first["clients/late"] == 10 - len(on_time) and first["clients/dropped"] == 0
    assert first["sim/round_s"] == pytest.approx(0.3, rel=1e-12)  # stragglers: waited to the end
    state = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert int(state["downlink"]["version"][3]) == -1  # offline: never contacted
    history = rows(tmp_path / "run")
    assert history[-1]["sim/clock_s"] == pytest.approx(sum(r["sim/round_s"] for r in history))
    hit = next(r for r in history if r["test/acc"] >= 0.1)
    assert summary["time_to_target_s"] == hit["sim/clock_s"]
    assert summary["bits_to_target"] == hit["bits/uplink_cum"] + hit["bits/downlink_cum"]
    (offline,) = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    wb = read_run(next(offline.glob("run-*.wandb")))
    assert wb["axes"]["vs_clock/test/acc"] == "sim/clock_s"
    assert wb["history"][0]["vs_clock/test/acc"] == first["test/acc"]
    assert main(["plot", str(tmp_path / "run"), "--x", "time", "-o", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "acc_vs_time.png").is_file()


def test_the_clock_resumes_and_compare_shows_virtual_time(tmp_path, capsys):
    job = ["network.uplink_mbps=1", "network.downlink_mbps=10", "system.compute_s_per_sample=0.01",
           "system.compute_spread=1.0", "system.over_select=1.3", "target_acc=0.1"]  # fmt: skip
    run(make_cfg(tmp_path / "runs" / "a", *job, "fed.rounds=2"))
    resumed = run(make_cfg(tmp_path / "runs" / "a", *job, "fed.rounds=4"))
    whole = run(make_cfg(tmp_path / "whole", *job, "fed.rounds=4"))
    assert resumed == whole

    def results(run_dir: Path) -> list[dict[str, float]]:  # all but the wall-clock times
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows(run_dir)]

    assert results(tmp_path / "runs" / "a") == results(tmp_path / "whole")
    late = [r["clients/late"] for r in rows(tmp_path / "whole")]
    assert all(n >= 3 for n in late)  # ceil(10 x 1.3) contacted, the first 10 kept
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "runs")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].endswith("| virtual s to target | virtual s |")
    clock = rows(tmp_path / "whole")[-1]["sim/clock_s"]
    assert table[2].endswith(f" | {clock:.1f} |") and math.isfinite(clock)


TRACE = "client,compute_s_per_sample,uplink_mbps,downlink_mbps,latency_ms"
BAD = [
    ("trace.csv", "client,compute,up\n0,1,1\n", "the header is 'client,compute,up'; must be"),
    (
        "trace.csv",
        "client,compute_s_per_sample,uplink_mbps,downlink_mbps,latency_ms\n0,0.1,1,10,5\n",
        "no row for client 1 (19 of 20 missing)",
    ),
    (
        "trace.csv",
        "client,compute_s_per_sample,uplink_mbps,downlink_mbps,latency_ms\n0,0.1,0,10,5\n",
        ":2: uplink_mbps='0': must be a finite number > 0",
    ),
    (
        "trace.csv",
        "client,compute_s_per_sample,uplink_mbps,downlink_mbps,latency_ms\n20,0.1,1,10,5\n",
        ":2: client='20': must be an integer in [0, 20)",
    ),
    ("avail.csv", "client,start_s,end_s\n1,5,nan\n", ":2: end_s='nan': must be a finite number"),
    ("avail.csv", "client,start_s,end_s\n1,5,2\n", ":2: end_s='2': must be after start_s='5'"),
]


@pytest.mark.parametrize("name,text,needle", BAD, ids=[b[2][:30] for b in BAD])
def test_a_bad_trace_is_one_line_and_exit_2(tmp_path, capsys, name, text, needle):
    (tmp_path / name).write_text(text)
    key = "system.trace" if name == "trace.csv" else "system.availability"
    run_dir = tmp_path / "run"
    extra = [] if name == "trace.csv" else ["system.compute_s_per_sample=0.01"]
    code = main(["train", f"hydra.run.dir={run_dir}", f"{key}={tmp_path / name}", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not run_dir.exists()


def test_parquet_tables_read_as_their_csv_and_are_checked_alike(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fedbat.traces import read_availability, read_trace

    trace = {"client": [1, 0], "compute_s_per_sample": [0.2, 0.01], "uplink_mbps": [1.0, 2.5],
             "downlink_mbps": [10.0, 20.0], "latency_ms": [5.0, 0.0]}  # fmt: skip
    online = {"client": [0, 0, 1], "start_s": [5.0, 0.0, 3.0], "end_s": [9.0, 6.0, math.inf]}
    pq.write_table(pa.table(trace), tmp_path / "trace.parquet")
    pq.write_table(pa.table(online), tmp_path / "online.parquet")
    rows_of = [",".join(str(trace[k][i]) for k in trace) for i in range(2)]
    csv_trace = write_csv(tmp_path / "trace.csv", ",".join(trace), rows_of)
    assert read_trace(tmp_path / "trace.parquet", 2) == read_trace(csv_trace, 2)
    assert read_trace(csv_trace, 2)[1].uplink_bps == 1e6  # client 1's row, by hand
    assert read_availability(tmp_path / "online.parquet", 2) == {
        0: [(0.0, 9.0)],
        1: [(3.0, math.inf)],
    }
    bad = dict(trace, uplink_mbps=[1.0, -2.0])
    pq.write_table(pa.table(bad), tmp_path / "bad.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    for name, needle in [("bad.parquet", ":row 2: uplink_mbps='-2.0': must be a finite number > 0"),
                         ("junk.parquet", "not a readable Parquet file")]:  # fmt: skip
        code = main(["train", f"hydra.run.dir={tmp_path / 'r'}", f"system.trace={tmp_path / name}",
                     "data.num_clients=2", "fed.clients_per_round=2"])  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert code == 2 and needle in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "r").exists()


def test_a_round_policy_without_a_clock_is_refused(tmp_path, capsys):
    code = main(["train", f"hydra.run.dir={tmp_path / 'r'}", "system.deadline_s=10"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "system.deadline_s=10: rounds have no time to act on" in err, err


class _Touch:
    """What a malicious pickle does: run code on load (here, create a file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_fedscale_traces_convert_as_data_and_train(tmp_path, capsys):
    """FedScale's formats (ms a sample for inference, kbit/s both ways; intervals repeating
    every finish_time s), converted by hand: client 0 is the smallest key."""
    import pickle

    capacity = {k: {"computation": 10.0 + k, "communication": 5000.0} for k in range(30, 5, -1)}
    behave = {6: {"active": [0, 100], "inactive": [50, 150], "finish_time": 200,
                  "duration": 200, "model": "x"}}  # fmt: skip
    (tmp_path / "cap").write_bytes(pickle.dumps(capacity))
    (tmp_path / "beh").write_bytes(pickle.dumps(behave))
    out = tmp_path / "csv"
    cmd = ["fedscale-trace", str(tmp_path / "cap"), str(tmp_path / "beh"), "--clients", "20",
           "--horizon-s", "400", "-o", str(out)]  # fmt: skip
    assert main(cmd) == 0
    trace = read_csv(out / "trace.csv")
    assert len(trace) == 20 and trace[0]["client"] == "0"
    assert float(trace[0]["compute_s_per_sample"]) == pytest.approx(3 * 16.0 / 1000)  # key 6
    assert float(trace[0]["uplink_mbps"]) == float(trace[0]["downlink_mbps"]) == 5.12
    spans = [(float(r["start_s"]), float(r["end_s"])) for r in read_csv(out / "availability.csv")]
    assert spans == [(0, 50), (100, 150), (200, 250), (300, 350)]
    capsys.readouterr()
    system = [
        f"system.trace={out / 'trace.csv'}",
        f"system.availability={out / 'availability.csv'}",
    ]
    assert main(["train", f"hydra.run.dir={tmp_path / 'run'}", "fed.rounds=1", "progress=false",
                 *system]) == 0  # fmt: skip
    assert rows(tmp_path / "run")[0]["sim/clock_s"] > 0
    # a pickle that would run code is refused before anything runs
    (tmp_path / "evil").write_bytes(pickle.dumps({1: _Touch(tmp_path / "pwned")}))
    capsys.readouterr()
    assert main(["fedscale-trace", str(tmp_path / "evil"), "--clients", "1", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "the pickle names pathlib" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "pwned").exists()


def test_a_run_without_devices_logs_as_before(tmp_path):
    """No ``system.*`` and no ``network.*``: no clock, no new metrics, the plain draw."""
    run(make_cfg(tmp_path, "fed.rounds=1"))
    (row,) = rows(tmp_path)
    new = ("sim/", "clients/dropped", "clients/late", "clients/started", "fedbuff/")
    assert not [k for k in row if k.startswith(new)]
    summary = (tmp_path / "summary.json").read_text()
    assert '"time_to_target_s": null' in summary and '"bits_to_target": null' in summary
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    held = {c for c in range(20) if int(state["downlink"]["version"][c]) == 0}
    assert held == set(sample_clients(0, 0, 20, 10))  # the round's clients, as drawn before
