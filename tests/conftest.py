"""Shared helpers: compose real configs the way ``fedbat train`` does, in a tmp run dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict

from fedbat.compose import compose

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_ROOT / "train-images-idx3-ubyte.gz").is_file() and not os.environ.get("CI"),
    reason="FMNIST not installed (apt-get install dataset-fashion-mnist); required in CI",
)


def make_cfg(run_dir: Path, *overrides: str) -> DictConfig:
    """The composed config for ``overrides`` with small, fast defaults for tests."""
    base = ["fed.rounds=3", "progress=false"]
    cfg = compose([*base, *overrides])
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network: W&B always offline, its files in the test's tmp dir."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")


SLOW = "FEDBAT_SLOW_TESTS"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"slow: processes started anew (imports of several seconds each); {SLOW}=1"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests (subprocesses, real launches) run in a CI step of their own."""
    if os.environ.get(SLOW):
        return
    skip = pytest.mark.skip(
        reason=f"slow: {SLOW}=1 python -m pytest -m slow (.ci/run runs them after the suite)"
    )
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session: pytest.Session) -> None:
    """SLURM jobs start with the session, so their waiting overlaps the other tests."""
    if any(item.nodeid.startswith("tests/test_slurm.py") for item in session.items):
        from tests import slurm_jobs

        slurm_jobs.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    import sys

    if "tests.slurm_jobs" in sys.modules:
        sys.modules["tests.slurm_jobs"].cancel_all()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 4 MB filesystem (tmpfs) at ``tmp_path / "disk"``, to run out of space on;
    skipped where this process may not mount one."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` until ``leave`` bytes are free."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


@pytest.fixture(scope="session")
def cnn4_update(tmp_path_factory) -> torch.Tensor:
    """The largest conv-weight update of one real FMNIST cnn4 client (one local epoch),
    computed once for every test that checks a compressor against it."""
    import fedbat.compressors as C
    from fedbat.client import ClientJob, train_client
    from tests.helpers import components

    if not (FMNIST_ROOT / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("FMNIST not installed (apt-get install dataset-fashion-mnist)")
    parts = components(tmp_path_factory.mktemp("cnn4"), "data=fmnist", "model=cnn4",
                       "data.num_clients=100", "compressor=none")  # fmt: skip
    held = {k: v.clone() for k, v in parts.task.state_dict().items()}
    res = train_client(parts.setup, ClientJob(client=0, round=0, held=held))
    update, _ = C.decode_update(res.data, parts.plan, parts.uplink)
    convs = [s for s in parts.plan if s.compressed and len(s.shape) == 4]
    name = max(convs, key=lambda s: s.numel).name  # the largest conv weight
    return update[name].reshape(-1)
