"""The ``fedbat`` command as users run it: real subprocesses, real exit codes."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedbat.cli import main
from tests.helpers import fedbat_cli


@pytest.mark.slow
def test_train_with_overrides_writes_metrics(tmp_path):
    out = fedbat_cli(
        "train",
        "fed.rounds=2",
        "data.partition=dirichlet",
        "data.alpha=0.5",
        "compressor=fedbat",
        "compressor.downlink=none",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "round 2/2" in out.stdout and "acc" in out.stdout  # plain progress lines off a tty
    (run_dir,) = (tmp_path / "runs").glob("digits_mlp_fedbat/*")
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["round"] for r in rows] == ["1", "2"]  # rounds count from 1 everywhere
    cfg = (run_dir / "config.yaml").read_text()
    assert "partition: dirichlet" in cfg and "downlink: none" in cfg


@pytest.mark.slow
def test_cfg_job_prints_resolved_config(tmp_path):
    out = fedbat_cli(
        "train", "--cfg", "job", "data=fmnist", "model=cnn4", "compressor=topk", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert "name: fmnist" in out.stdout and "ratio: 0.01" in out.stdout
    assert not (tmp_path / "runs").exists()


def test_list_shows_every_registry(capsys):
    from fedbat.compressors import COMPRESSORS
    from fedbat.datamodules import PARTITIONERS, READERS
    from fedbat.models import MODELS
    from fedbat.strategies import STRATEGIES, WRAPPERS

    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for registry in (COMPRESSORS, STRATEGIES, WRAPPERS, READERS, MODELS, PARTITIONERS):
        for name in registry:
            assert name in text, name
    # bits per coordinate worked by hand: 4 or 8 bits plus an fp32 scale per 64; 5 trits a byte
    for line in ("nf4: 4.5 bits/coord", "int8: 8.5 bits/coord", "terngrad: 1.6 bits/coord",
                 "none: 32 bits/coord", "fedbat: 1 bits/coord; rho=6.0"):  # fmt: skip
        assert line in text, line


@pytest.mark.parametrize(
    "args,needle",
    [
        (["data=imagenet"], "data=imagenet: unknown data option; available: cifar10"),
        (["data.name=imagenet"], "data.name='imagenet'"),
        (["model.name=vgg"], "model.name='vgg'"),
        (["compressor=zip"], "compressor=zip: unknown compressor option"),
    ],
)
def test_unknown_names_fail_in_one_line(args, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_missing_dataset_exits_2_with_one_line(tmp_path):
    out = fedbat_cli("train", "data=cifar10", f"data.root={tmp_path / 'none'}", cwd=tmp_path)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "files not found" in lines[0] and "Traceback" not in out.stderr


@pytest.mark.skipif(
    torch.cuda.is_available() or torch.backends.mps.is_available(), reason="has a GPU"
)
@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_gpu_on_a_machine_without_one_fails_in_one_line(accelerator, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", f"trainer.accelerator={accelerator}"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"trainer.accelerator='{accelerator}': no such device" in err and "\n" not in err
    assert not (tmp_path / "runs").exists()


def test_unknown_command():
    assert main(["trian"]) == 2


@pytest.mark.slow
def test_example_registers_its_own_model_and_dataset_on_every_rank(tmp_path):
    """examples/custom_model_and_data.py on 2 processes: each relaunched rank registers too."""
    script = Path(__file__).parent.parent / "examples" / "custom_model_and_data.py"
    out = subprocess.run(
        [
            sys.executable,
            str(script),
            "train",
            "data.name=breast_cancer",
            "model.name=tabular_mlp",
            "data.num_clients=10",
            "fed.clients_per_round=4",
            "compressor=fedbat",
            "fed.rounds=4",
            "trainer.devices=2",
            "progress=false",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "metrics.csv") as f:
        acc = [float(r["test/acc"]) for r in csv.DictReader(f)]
    assert len(acc) == 4 and acc[-1] > 0.85  # a real (easy) table: 2 classes, 30 features


def _user_project(root: Path) -> Path:
    """A user's project whose own top-level packages share fedbat's folder names."""
    for name in ("configs", "compressors", "datamodules"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name}')\n")
    (root / "configs" / "train.yaml").write_text("not: fedbat's\n")
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher",
    [
        ["fedbat"],  # python -m fedbat.cli: the other tests' way
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=1",
            "-m",
            "fedbat.cli",
        ],
    ],
    ids=["console-script", "torchrun-m"],
)
def test_runs_from_a_project_with_its_own_configs_and_compressors(tmp_path, launcher):
    import shutil

    project = _user_project(tmp_path / "project")
    if launcher[0] == "fedbat":
        launcher = [shutil.which("fedbat") or pytest.skip("console script not on PATH")]
    out = subprocess.run(
        [*launcher, "train", "fed.rounds=1", "compressor=fedbat", "progress=false"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert list((project / "runs").glob("digits_mlp_fedbat/*/metrics.csv"))


@pytest.mark.slow
def test_train_help_explains_the_keys(tmp_path):
    out = fedbat_cli("train", "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "fedbat train [group=option ...]" in out.stdout
    assert "strategy: fedadagrad, fedadam, fedavg" in out.stdout  # the groups, from Hydra
    assert "raising it on a finished run extends it" in out.stdout  # the keys, explained
    assert "max_update_ratio: 1000.0" in out.stdout  # and the whole config
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("line", "want"),
    [
        ("fedbat train compressor=fe", "compressor=fedbat"),
        ("fedbat train fed.ro", "fed.rounds="),
        ("fedbat train strategy=sca", "strategy=scaffold"),
    ],
)
def test_shell_completion_completes_the_train_command(line, want, monkeypatch, capsys):
    """What bash asks once `eval "$(fedbat -sc install=bash)"` has run."""
    monkeypatch.setenv("COMP_LINE", line)
    monkeypatch.setenv("COMP_POINT", str(len(line)))
    assert main(["-sc", "query=bash"]) == 0
    assert capsys.readouterr().out.split() == [want]


def test_shell_completion_installs_for_the_fedbat_command(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/fedbat", "-sc", "install=bash"])
    assert main(["-sc", "install=bash"]) == 0
    assert "-F hydra_bash_completion fedbat" in capsys.readouterr().out


def test_hydra_names_run_dirs_without_exactly_the_resume_free_keys():
    """Hydra's run-dir names (``exclude_keys``) and fedbat's own (``config.run_name``, used by
    ``fedbat.fit``, ``fedbat flower`` and the examples) leave out the same keys: every key
    Hydra leaves out is resume-free, and every resume-free leaf under trainer, checkpoint and
    the report keys is left out by Hydra too."""
    from omegaconf import OmegaConf

    from fedbat.compose import compose
    from fedbat.config import is_free

    yaml = (Path(__file__).parent.parent / "configs" / "train.yaml").read_text()
    excluded = OmegaConf.create(yaml).hydra.job.config.override_dirname.exclude_keys
    assert all(is_free(k) for k in excluded), [k for k in excluded if not is_free(k)]
    composed = compose([])
    leaves = [f"{group}.{k}" for group in ("trainer", "checkpoint") for k in composed[group]]
    leaves += ["fed.rounds", "target_acc", "monitor", "monitor_mode", "resume", "run_dir"]
    assert [k for k in leaves if is_free(k) and k not in excluded] == []
    assert not is_free("trainer.precision") and "trainer.precision" not in excluded
