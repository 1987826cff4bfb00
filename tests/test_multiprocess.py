"""Real 2-process runs (Lightning Fabric, DDP on CPU with gloo) against 1-process runs."""

import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest

from fedbat import checkpoint, clientstore
from fedbat.lifecycle import run
from tests.conftest import make_cfg
from tests.helpers import assert_same_run

pytestmark = pytest.mark.slow  # every test starts processes: .ci/run's slow step

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def two_processes(
    run_dir: Path, *overrides: str, script: Path | None = None, launcher: Sequence[str] = ()
):
    """``fedbat train`` on 2 CPU processes: Fabric launches them, or ``launcher`` does."""
    entry = [str(script)] if script else ["-m", "fedbat.cli"]
    return subprocess.run(
        [
            sys.executable,
            *launcher,
            *entry,
            "train",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            f"hydra.run.dir={run_dir}",
            "progress=false",
            *overrides,
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )


# Float reductions (matmul, convolution) split their sums by the intra-op thread count, and
# by default a process gets cores / processes threads: runs are bitwise equal across world
# sizes when every process uses the same trainer.threads, so every comparison pins it.
PINNED = "trainer.threads=1"
EDEN_EF = ["compressor.bits=1.5", "compressor.error_feedback=true"]  # shared seeds, both ways
LINKS = ["network.uplink_mbps=1", "network.downlink_mbps=10", "system.compute_spread=1.0",
         "system.compute_s_per_sample=0.01"]  # fmt: skip
CLOCK = [*LINKS, "system.over_select=1.4", "system.deadline_s=1.2"]


@pytest.mark.parametrize(
    ("compressor", "launcher", "extra", "resumed"),
    [
        ("eden", [], [*EDEN_EF, "strategy=fedadam", "strategy.lr=0.1"], True),
        ("ef_signsgd", TORCHRUN, [], False),
        ("fedbat", [], ["model=cnn", "strategy=scaffold"], False),
        ("powersgd", [], ["compressor.rank=2", "strategy=fedavgm"], True),
        ("ef_signsgd", [], CLOCK, True),
        ("signsgd", [], [*LINKS, "strategy=fedbuff", "strategy.buffer_size=3"], True),
        (
            "signsgd",
            [],
            ["privacy=dp", "privacy.mode=client", "privacy.noise_multiplier=0.5"],
            True,
        ),
    ],
    ids=[
        "eden-shared-randomness-ef-fedadam-resumed",
        "ef_signsgd-torchrun",
        "fedbat-cnn-scaffold",
        "powersgd-compressor-state-resumed",
        "ef_signsgd-clock-late-and-over-selected-resumed",
        "signsgd-fedbuff-in-flight-resumed",
        "signsgd-client-dp-noise-resumed",
    ],
)
def test_two_processes_match_one_process_exactly(tmp_path, compressor, launcher, extra, resumed):
    """``resumed``: the 2-process run stops after round 2 and a second 2-process run of 3
    rounds resumes it (every rank reads the checkpoint)."""
    overrides = [f"compressor={compressor}", "fed.clients_per_round=5", PINNED, *extra]
    if resumed:
        first = two_processes(tmp_path / "two", *overrides, "fed.rounds=2", launcher=launcher)
        assert first.returncode == 0, first.stderr
    out = two_processes(tmp_path / "two", *overrides, "fed.rounds=3", launcher=launcher)
    assert out.returncode == 0, out.stderr
    assert "MEMBER: 2/2" in out.stdout + out.stderr  # really one job of two ranks
    assert ("after round 2 of 3" in out.stdout + out.stderr) == resumed
    run(make_cfg(tmp_path / "one", *overrides, "fed.rounds=3"))
    assert_same_run(tmp_path / "one", tmp_path / "two")
    with open(tmp_path / "two" / "metrics.csv") as f:
        assert len(f.read().strip().splitlines()) == 1 + 3  # header + every round once
    kept = clientstore.read(tmp_path / "one", checkpoint.load(tmp_path / "one" / "checkpoint.pt"))
    if compressor in ("ef_signsgd", "powersgd") or "compressor.error_feedback=true" in extra:
        assert any("/residual/" in k for k in kept)
    assert any("/compressor/" in k for k in kept) == (compressor == "powersgd")
    assert any("/state/" in k for k in kept) == ("strategy=scaffold" in extra)


def slurm_task_env(rank: int, port: int) -> dict[str, str]:
    """The variables ``srun --ntasks=2`` on one node gives task ``rank``."""
    return {
        **os.environ,
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "fedbat",
        "SLURM_NODELIST": "localhost",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def test_slurm_tasks_form_one_job_that_matches_one_process(tmp_path):
    """Two tasks started as srun starts them: Fabric's SLURM environment joins them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = ["compressor=ef_signsgd", "fed.rounds=3", "fed.clients_per_round=5", PINNED]
    cmd = [sys.executable, "-m", "fedbat.cli", "train", "trainer.devices=2", "progress=false"]
    tasks = [
        subprocess.Popen(
            [*cmd, f"hydra.run.dir={tmp_path / 'two'}", *overrides],
            env=slurm_task_env(rank, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outs = [t.communicate(timeout=240)[0] for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], outs
    # each task is one rank (Fabric launched no processes of its own)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in outs[0] and "GLOBAL_RANK: 1" not in outs[0]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outs[1]
    run(make_cfg(tmp_path / "one", *overrides))
    assert_same_run(tmp_path / "one", tmp_path / "two")


FAULTY = textwrap.dedent(
    """
    import os, sys, time
    from torch import nn
    from fedbat.cli import main
    from fedbat.models import register

    class Faulty(nn.Module):
        def __init__(self, n_in, n_out):
            super().__init__()
            self.lin = nn.Linear(n_in, n_out)

        def forward(self, x):
            if self.training and os.environ.get("LOCAL_RANK") == "1":
                time.sleep(2)  # rank 0 is waiting in the exchange by now
                raise RuntimeError("injected failure on rank 1")
            return self.lin(x.flatten(1))

    @register("faulty")
    def faulty(input_shape, num_classes, **_):
        return Faulty(64, num_classes)

    sys.exit(main(sys.argv[1:]))
    """
)


def test_failing_rank_fails_the_job_without_hanging(tmp_path):
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY)
    out = two_processes(tmp_path / "run", "model.name=faulty", "fed.rounds=3", script=script)
    assert out.returncode != 0
    assert "injected failure on rank 1" in out.stderr + out.stdout
    # the rank left waiting in the exchange says so in one line, not a gloo traceback
    assert "rank 0: another process stopped during the packet exchange" in out.stderr
    assert out.stderr.count("Traceback") == 1  # rank 1's own


def test_slurm_ntasks_without_ntasks_per_node_is_one_line(tmp_path, monkeypatch):
    """Lightning reads --ntasks-per-node, not --ntasks: a job script that sets only the
    latter is told so in one line (it was a RuntimeError traceback from Lightning)."""
    from fedbat.assembly import build_fabric
    from fedbat.errors import ConfigError

    for key, value in slurm_task_env(0, 29500).items():
        if key.startswith("SLURM_"):
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    cfg = make_cfg(tmp_path, "trainer.devices=2")
    with pytest.raises(ConfigError, match=r"^trainer: You set `--ntasks=2` .*--ntasks-per-node=2"):
        build_fabric(cfg)
