"""Per-client state on disk: one file per client, nothing per client in the checkpoint or in
memory between rounds; a lost file and an old checkpoint are handled."""

import csv
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedbat import checkpoint, clientstore
from fedbat.lifecycle import run
from fedbat.seeding import sample_clients
from tests.conftest import make_cfg

ARGS = ("compressor=ef_signsgd", "strategy=scaffold", "checkpoint.every=2", "trainer.threads=1")


def history(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [
            {k: v for k, v in r.items() if not k.startswith("time/")} for r in csv.DictReader(f)
        ]


def test_one_file_per_client_and_nothing_per_client_in_the_checkpoint(tmp_path):
    run(make_cfg(tmp_path, *ARGS, "fed.rounds=4"))
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    index = state["clients"]["index"]
    trained = [c for c in range(index.numel()) if index[c] >= 0]
    files = sorted(p.name for p in (tmp_path / "clients").iterdir())
    assert files == sorted(f"{c}.{int(index[c])}.safetensors" for c in trained)  # older: gone
    assert len(trained) > 10 and "uplink_memory" not in state
    kept = clientstore.read(tmp_path, state)
    assert {k.split("/")[1] for k in kept} == {"residual", "state"}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished 2-round run with a state file per trained client, copied by each test."""
    base = tmp_path_factory.mktemp("damage") / "base"
    run(make_cfg(base, *ARGS, "fed.rounds=2"))
    return base


def _truncate(path, other):
    path.write_bytes(path.read_bytes()[:100])


def _garbage(path, other):
    path.write_bytes(b"\x93NUMPY" + bytes(range(256)) * 40)


def _other_run(path, other):  # a valid file of another model width
    shutil.copy(next((other / "clients").glob("*.safetensors")), path)


def _symlink(path, other):
    path.unlink()
    path.symlink_to("/etc/passwd")


def _nan(path, other):
    tensors = load_file(path)
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, path)


def _missing(path, other):
    path.unlink()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_truncate, "unreadable"),
        (_garbage, "unreadable"),
        (_other_run, r"model.1.weight: \(16, 64\) torch.float32, this run keeps \(128, 64\)"),
        (_symlink, "a symbolic link, not followed"),
        (_nan, "non-finite values"),
        (_missing, "missing"),
    ],
)
def test_a_damaged_client_file_costs_that_client_its_state_not_the_run(
    tmp_path, base_run, capsys, damage, reason
):
    other = tmp_path / "other"
    if damage is _other_run:
        run(make_cfg(other, *ARGS, "fed.rounds=1", "model.hidden=16"))
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir, symlinks=True)
    state = checkpoint.load(run_dir / "checkpoint.pt")
    index = state["clients"]["index"]
    cfg = make_cfg(run_dir, *ARGS, "fed.rounds=3")
    sampled = sample_clients(cfg.seed, 2, cfg.data.num_clients, cfg.fed.clients_per_round)
    victim = next(c for c in sampled if index[c] >= 0)
    path = run_dir / "clients" / f"{victim}.{int(index[victim])}.safetensors"
    passwd = Path("/etc/passwd").read_bytes()
    damage(path, other)
    capsys.readouterr()
    run(cfg)  # and a rerun would resume from round 3: the file is out of the way
    out = capsys.readouterr().out
    assert re.search(rf"round 3: client {victim}: state reset, {path.name}: .*{reason}", out), out
    assert history(run_dir)[-1]["clients/state_reset"] == "1"
    assert checkpoint.load(run_dir / "checkpoint.pt")["round"] == 3
    aside = run_dir / "clients" / "damaged" / path.name
    assert (os.path.lexists(aside)) == (damage is not _missing)
    assert Path("/etc/passwd").read_bytes() == passwd
    new = checkpoint.load(run_dir / "checkpoint.pt")["clients"]["index"]
    assert new[victim] == 2 and (run_dir / "clients" / f"{victim}.2.safetensors").is_file()


def test_stale_temporary_client_files_are_removed_at_start(tmp_path, base_run):
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    stale = run_dir / "clients" / ".3.1.safetensors.4242.tmp"
    stale.write_bytes(b"half")
    run(make_cfg(run_dir, *ARGS, "fed.rounds=3"))
    assert not stale.exists()


def test_a_checkpoint_from_before_the_store_resumes_exactly(tmp_path):
    whole, old = tmp_path / "whole", tmp_path / "old"
    run(make_cfg(whole, *ARGS, "fed.rounds=4"))
    run(make_cfg(old, *ARGS, "fed.rounds=2"))
    state = checkpoint.load(old / "checkpoint.pt")  # rewritten as an older fedbat wrote it
    kept = clientstore.read(old, state)
    part = {p: {k.replace(f"/{p}/", "/"): v for k, v in kept.items() if f"/{p}/" in k}
            for p in ("residual", "state")}  # fmt: skip
    del state["clients"], state["format"]
    state["uplink_memory"], state["client_states"] = part["residual"], part["state"]
    torch.save(state, old / "checkpoint.pt")
    shutil.rmtree(old / "clients")
    run(make_cfg(old, *ARGS, "fed.rounds=4"))
    assert history(old) == history(whole)
