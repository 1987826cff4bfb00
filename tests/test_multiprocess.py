"""Real 2-process runs (Lightning Fabric, DDP on CPU with gloo) against 1-process runs."""

import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from fedbat import checkpoint
from fedbat.loop import run
from tests.conftest import make_cfg

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


@pytest.mark.parametrize(
    ("compressor", "launcher"),
    [("none", []), ("fedbat", []), ("ef_signsgd", []), ("ef_signsgd", TORCHRUN)],
    ids=["none", "fedbat", "ef_signsgd", "ef_signsgd-torchrun"],
)
def test_two_processes_match_one_process_exactly(tmp_path, compressor, launcher):
    overrides = [f"compressor={compressor}", "fed.rounds=3", "fed.clients_per_round=5"]
    out = two_processes(tmp_path / "two", *overrides, launcher=launcher)
    assert out.returncode == 0, out.stderr
    assert "MEMBER: 2/2" in out.stdout + out.stderr  # really one job of two ranks
    run(make_cfg(tmp_path / "one", *overrides))
    one = checkpoint.load(tmp_path / "one" / "checkpoint.pt")
    two = checkpoint.load(tmp_path / "two" / "checkpoint.pt")

    def stable(history):
        return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in history]

    assert stable(one["history"]) == stable(two["history"])
    for part in ("global", "held"):
        for k, v in one["server"][part].items():
            assert torch.equal(v, two["server"][part][k]), (part, k)
    assert one["uplink_memory"].keys() == two["uplink_memory"].keys()
    for k, v in one["uplink_memory"].items():  # residuals right whichever rank trained whom
        assert torch.equal(v, two["uplink_memory"][k]), k
    if compressor == "ef_signsgd":
        assert len(one["uplink_memory"]) > 0


FAULTY = textwrap.dedent(
    """
    import os, sys
    from torch import nn
    from fedbat.cli import main
    from fedbat.models import register

    class Faulty(nn.Module):
        def __init__(self, n_in, n_out):
            super().__init__()
            self.lin = nn.Linear(n_in, n_out)

        def forward(self, x):
            if os.environ.get("LOCAL_RANK") == "1":
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
