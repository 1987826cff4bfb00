"""Per-client state on disk: one file per client, nothing per client in the checkpoint or in
memory between rounds; a lost file and an old checkpoint are handled."""

import csv
import shutil

import pytest
import torch

from fedbat import checkpoint, clientstore
from fedbat.errors import CheckpointError
from fedbat.loop import run
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

    (tmp_path / "clients" / files[0]).unlink()  # a lost file: one line, nothing changed
    with pytest.raises(CheckpointError, match=r"client state file\(s\) missing, e.g. .*"):
        run(make_cfg(tmp_path, *ARGS, "fed.rounds=6"))
    assert checkpoint.load(tmp_path / "checkpoint.pt")["round"] == 4


def test_a_checkpoint_from_before_the_store_resumes_exactly(tmp_path):
    whole, old = tmp_path / "whole", tmp_path / "old"
    run(make_cfg(whole, *ARGS, "fed.rounds=4"))
    run(make_cfg(old, *ARGS, "fed.rounds=2"))
    state = checkpoint.load(old / "checkpoint.pt")  # rewritten as an older fedbat wrote it
    kept = clientstore.read(old, state)
    part = {p: {k.replace(f"/{p}/", "/"): v for k, v in kept.items() if f"/{p}/" in k}
            for p in ("residual", "state")}  # fmt: skip
    del state["clients"]
    state["uplink_memory"], state["client_states"] = part["residual"], part["state"]
    torch.save(state, old / "checkpoint.pt")
    shutil.rmtree(old / "clients")
    run(make_cfg(old, *ARGS, "fed.rounds=4"))
    assert history(old) == history(whole)
