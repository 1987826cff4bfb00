"""What a careless user gives fedbat: each is one line naming the value, exit code 2, and
nothing already written is lost or changed."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fedbat import checkpoint
from fedbat.cli import main
from fedbat.lifecycle import run
from tests.conftest import fill, make_cfg
from tests.helpers import metric_rows, train_command

NAN_KEYS = [
    "fed.lr",
    "strategy.lr",
    "fed.momentum",
    "fed.weight_decay",
    "strategy.momentum",
    "data.alpha",
    "target_acc",
    "fed.max_update_ratio",
]
FRESH_BAD = [
    *[([f"{k}=nan"], f"{k}=nan: must be") for k in NAN_KEYS],
    (["compressor=topk", "compressor.ratio=nan"], "compressor.ratio=nan"),
    (["compressor=fedbat", "compressor.rho=nan"], "compressor.rho=nan"),
    (["compressor=fedbat", "compressor.phi=nan"], "compressor.phi=nan"),
    (["data.num_clients=100000"], "data.num_clients=100000: the iid partition of 1437"),
    (["compressor.uplink=7"], "compressor.uplink=7: must be a compressor name or a mapping"),
    (["trainer.strategy=nosuch"], "trainer.strategy='nosuch': must be one of auto, ddp"),
    (["model.hidden=0"], "model.hidden=0: must be an integer >= 1"),
    (["model.depth=3"], "model.depth=3: no such key; model has: name, hidden"),
    (["compressor.error_feedback=maybe"], "compressor.error_feedback='maybe': must be true"),
    (["model=cnn4"], "model.name='cnn4': does not take the dataset's inputs of shape (1, 8, 8)"),
    (["data=imagenet"], "data=imagenet: unknown data option; available: cifar10, cifar100"),
    (
        ["+fed.roundz=3"],
        "fed.roundz=3: no such key; fed has: batch_size, bn_clients, bn_stats, clients_per_round",
    ),
    (["+foo=1"], "foo=1: no such key; the config has: checkpoint, compressor"),
    (["network.latency_ms=nan"], "network.latency_ms=nan: must be a number"),
    (["policy.modules=Linear"], "policy.modules='Linear': must be a list, e.g. policy.modules="),
    (["data.partition=dirichlet", "data.alpha=1e-9"], "data.alpha=1e-09: no dirichlet partition"),
]


@pytest.mark.parametrize("overrides,needle", FRESH_BAD, ids=[" ".join(o) for o, _ in FRESH_BAD])
def test_bad_value_one_line_exit_2_and_no_run_dir(tmp_path, overrides, needle, capsys):
    run_dir = tmp_path / "runs" / "new"
    code = main(["train", f"hydra.run.dir={run_dir}", "progress=false", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert needle in err and len(err.splitlines()) == 1, err
    assert not run_dir.exists()  # not even an empty run dir is left behind


def test_a_monitor_never_logged_says_so_at_the_end(tmp_path, capsys):
    assert main(["train", f"hydra.run.dir={tmp_path}", "progress=false", "fed.rounds=1",
                 "monitor=val_acc"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "fedbat: monitor='val_acc' was never logged" in out
    assert "logged: test/acc, test/loss, train/loss (set monitor=<one of them>)" in out


@pytest.mark.parametrize("out", ["x.png", "plots.pdf", "notes.txt"])
def test_plot_out_must_be_a_folder(tmp_path, capsys, out):
    run(make_cfg(tmp_path / "run", "fed.rounds=1"))
    (tmp_path / "notes.txt").write_text("mine")
    target = tmp_path / out
    assert main(["plot", str(tmp_path / "run"), "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"fedbat: error: --out {target}: must be a folder (it receives "
        "acc_vs_<axis>.<format> files), e.g. --out plots"
    )
    assert not target.is_dir() and (tmp_path / "notes.txt").read_text() == "mine"


def test_run_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert main(["train", f"hydra.run.dir={target}", "progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("exists and is not a directory") and len(err.splitlines()) == 1
    assert target.read_text() == "mine"


@pytest.mark.parametrize(
    "damage",
    [lambda b: b[: len(b) // 2], lambda b: b"\x00garbage" * 100, lambda b: b""],
    ids=["truncated", "garbage", "empty"],
)
@pytest.mark.parametrize("how", ["found", "resume="])
def test_damaged_checkpoint_one_line_and_left_as_is(tmp_path, capsys, damage, how):
    run_dir = tmp_path / "run"
    run(make_cfg(run_dir, "fed.rounds=1"))
    ckpt = run_dir / "checkpoint.pt"
    if how == "resume=":
        ckpt = ckpt.rename(tmp_path / "elsewhere.pt")
    ckpt.write_bytes(damage(ckpt.read_bytes()))
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    extra = [f"resume={ckpt}"] if how == "resume=" else []
    code = main(["train", f"hydra.run.dir={run_dir}", "progress=false", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a readable checkpoint" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_a_checkpoint_of_a_newer_format_is_refused_in_one_line(tmp_path, capsys):
    run(make_cfg(tmp_path, "fed.rounds=1"))
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    torch.save(state | {"format": 99}, tmp_path / "checkpoint.pt")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main(["train", f"hydra.run.dir={tmp_path}", "fed.rounds=2", "progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("checkpoint format 99; this fedbat reads formats 1 to 3 (a newer "
                        "fedbat wrote it?)") and len(err.splitlines()) == 1, err  # fmt: skip
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_resuming_another_models_checkpoint_names_the_model(tmp_path, capsys):
    run(make_cfg(tmp_path / "cnn", "model=cnn", "fed.rounds=1"))
    code = main(
        ["train", f"hydra.run.dir={tmp_path / 'mlp'}", f"resume={tmp_path / 'cnn'}/checkpoint.pt"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fedbat: error: model.name='mlp': the checkpoint"), err


def test_lowering_rounds_of_a_finished_run_is_refused(tmp_path, capsys):
    run(make_cfg(tmp_path, "fed.rounds=2"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main(["train", f"hydra.run.dir={tmp_path}", "fed.rounds=1", "progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert "fed.rounds=1: the checkpoint" in err and "already completed 2 rounds" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


SLOW = ["model=cnn", "fed.local_epochs=8", "fed.rounds=4"]  # ~0.5 s/round on 2 cores
# a user's module whose steps sleep: a run that lasts without taking the CPU from the others
PACED = [
    "task._target_=tests.user_project.lit.PacedClassifier",
    "datamodule._target_=tests.user_project.lit.DigitsDataModule",
    "fed.clients_per_round=2",  # ~0.6 s a round
]
PACED_ENV = {**os.environ, "FEDBAT_TEST_PACE": "0.1"}


def wait_for(path: Path, proc: subprocess.Popen, limit: float = 60) -> None:
    end = time.time() + limit
    while not path.exists():
        assert proc.poll() is None and time.time() < end, proc.communicate()
        time.sleep(0.02)


@pytest.mark.slow
def test_second_run_in_the_same_dir_fails_at_once_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    long = [*PACED, "fed.rounds=500"]  # minutes of sleeping steps: the second comes in between
    first = subprocess.Popen(
        train_command(run_dir, *long), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=PACED_ENV
    )
    wait_for(run_dir / "checkpoint.pt", first)  # a round logged: the holder is mid-run
    second = subprocess.run(
        train_command(run_dir, *long), capture_output=True, text=True, timeout=60
    )
    assert first.poll() is None  # the holder was still running throughout
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 143
    assert second.returncode == 2
    assert f"in use by process {first.pid} on" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    rounds = [int(r["round"]) for r in metric_rows(run_dir)]
    assert rounds == list(
        range(1, len(rounds) + 1)
    )  # one writer: no duplicated or interleaved rows
    assert not (run_dir / ".lock").exists()


def test_stale_temporary_checkpoint_is_cleaned_up(tmp_path):
    (tmp_path / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")
    run(make_cfg(tmp_path, "fed.rounds=1"))
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_sigterm_in_round_0_does_not_claim_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        train_command(
            run_dir, "model=cnn", "fed.local_epochs=1000", "fed.rounds=2"
        ),  # round 0: > 1 min
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(run_dir / "config.yaml", proc)
    time.sleep(1.0)  # inside round 0's local training
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "interrupted (SIGTERM); no round had completed" in err
    assert not (run_dir / "checkpoint.pt").exists()


@pytest.mark.slow
def test_run_dir_gone_mid_run_is_one_line(tmp_path):
    """The run dir replaced by a file while the run goes on: the next write fails, in one
    line, exit 2."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        train_command(run_dir, *PACED),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=PACED_ENV,
    )
    wait_for(run_dir / "checkpoint.pt", proc)
    shutil.rmtree(run_dir)
    run_dir.write_text("not a directory any more")
    _, err = proc.communicate(timeout=120)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2, lines
    assert lines[-1].startswith(f"fedbat: error: run_dir={run_dir}: cannot write"), lines
    assert "Traceback" not in err.decode()


@pytest.mark.parametrize(
    "args",
    [
        ["--multirun", "compressor=none,fedbat", "fed.lr=0.1,nan"],  # job 3 of 4 is bad
        ["-m", "seed=0,1", "compressor=none,nosuch"],
        ["--cfg", "job", "fed.lr=nan"],
    ],
)
def test_every_job_of_a_sweep_is_validated_before_any_starts(tmp_path, capsys, args):
    """One line, exit 2, and no sweep dir: Hydra never started (in-process: it would)."""
    sweep = tmp_path / "sweep"
    assert main(["train", *args, "fed.rounds=1", f"hydra.sweep.dir={sweep}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedbat: error: ")
    assert ("fed.lr=nan: must be a number" in err[0]) or ("compressor=nosuch" in err[0])
    assert not sweep.exists()


@pytest.mark.parametrize("args", [[], ["compressor=ef_signsgd"]], ids=["checkpoint", "clients"])
def test_disk_full_mid_run_is_one_line_and_keeps_the_last_checkpoint(small_disk, capsys, args):
    """A real filesystem that fills up: the checkpoint (torch reports ENOSPC its own way) or a
    client's state file cannot be written; one line, exit 2, no temporary file left, and
    the last checkpoint intact."""
    run_dir = small_disk / "run"
    assert main(["train", f"hydra.run.dir={run_dir}", "progress=false", "fed.rounds=1", *args]) == 0
    before = (run_dir / "checkpoint.pt").read_bytes()
    fill(small_disk, leave=8192)
    capsys.readouterr()
    code = main(["train", f"hydra.run.dir={run_dir}", "progress=false", "fed.rounds=3", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"fedbat: error: run_dir={run_dir}: cannot write"), err
    assert err[0].endswith("its last checkpoint is kept"), err
    assert (run_dir / "checkpoint.pt").read_bytes() == before
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("value", ["''", "", "' '"])
def test_an_empty_run_dir_is_refused_and_the_working_dir_untouched(tmp_path, monkeypatch, capsys,
                                                                  value):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("a project's own")
    assert main(["train", f"run_dir={value}", "progress=false", "fed.rounds=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedbat: error: run_dir=") and ": must be a folder" in err
    assert len(err.splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    assert (tmp_path / "config.yaml").read_text() == "a project's own"
