"""A LightningModule and LightningDataModule written without fedbat in mind
(``tests/user_project/lit.py``) trained through ``fedbat.fit`` and the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fedbat
from fedbat import checkpoint, clientstore
from fedbat.errors import ConfigError
from tests.helpers import rows
from tests.user_project.lit import (
    DigitsDataModule,
    LitClassifier,
    ManualClassifier,
    ReturnsClassifier,
)

ROOT = Path(__file__).parent.parent
BASE = ["fed.rounds=3", "fed.clients_per_round=5", "data.num_clients=10", "progress=false"]
BASE += ["monitor=val_acc"]


def fit(tmp_path: Path, module=None, *overrides: str, **kw):
    torch.manual_seed(0)  # as a user seeds before building the module
    module = module or LitClassifier(lr=0.5)
    args = [*BASE, f"run_dir={tmp_path}", *overrides]
    return fedbat.fit(module, DigitsDataModule(), overrides=args, **kw)


@pytest.mark.parametrize("form", ["optimizer", "list", "lists", "dict", "dict-step"])
def test_every_configure_optimizers_form_trains(tmp_path, form):
    torch.manual_seed(0)
    module = LitClassifier(lr=0.5, optim=form)
    summary = fit(tmp_path, module)
    assert module.epochs_started == 3 * 5 * 2  # on_train_epoch_start: rounds x clients x epochs
    r = rows(tmp_path)
    acc = [float(x["val_acc"]) for x in r]
    assert summary["final_acc"] == pytest.approx(acc[-1]) and acc[-1] > 0.4, acc
    assert float(r[-1]["train_loss"]) < float(r[0]["train_loss"])  # self.log in training_step
    assert "val_loss" in r[0]  # self.log of a tensor in validation_step
    if form in ("lists", "dict"):  # StepLR(1, 0.5), interval epoch: halves every round
        assert [float(x["train/lr"]) for x in r] == [0.5, 0.25, 0.125]
    if form == "dict-step":  # halves every 4 local steps, counted by the round's longest client
        steps = [0, 10, 20]  # 2 epochs x 5 batches of <= 32 samples for every client
        assert [float(x["train/lr"]) for x in r] == [0.5 * 0.5 ** (s // 4) for s in steps]


@pytest.mark.parametrize(
    ("module", "needle"),
    [
        (LitClassifier(optim="two"), "gave 2 optimizer(s) (SGD, Adam)"),
        (LitClassifier(optim="plateau"), "ReduceLROnPlateau is not supported"),
        (ManualClassifier(), "manual optimization"),
        (ReturnsClassifier(None), "training_step returned NoneType"),
        (ReturnsClassifier({"logits": 1}), "training_step returned a dict without 'loss' (keys:"),
        (torch.nn.Linear(2, 2), "fit: module is a Linear; it must be a LightningModule"),
    ],
    ids=["two-optimizers", "plateau", "manual", "none", "no-loss", "not-lightning"],
)
def test_what_cannot_be_honoured_fails_before_any_work(tmp_path, module, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        fit(tmp_path / "run", module)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ("fed.rounds=2", "fit: overrides='fed.rounds=2': must be a list of 'key=value' strings"),
        ({"fed.rounds": 2}, "fit: overrides={'fed.rounds': 2}: must be a list"),
        (["fed.roundz=2"], "fed.roundz=2: no such key; fed has: rounds,"),
        (["compressor=nosuch"], "compressor=nosuch: unknown compressor option; available:"),
        ([3], "fit: overrides: 3 is not a 'key=value' string"),
    ],
)
def test_fit_refuses_bad_overrides_in_one_line(tmp_path, monkeypatch, overrides, needle):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        fedbat.fit(LitClassifier(), DigitsDataModule(), overrides=overrides)
    assert str(err.value).startswith(needle) and len(str(err.value).splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_scheduler_continues_across_a_resume_bitwise(tmp_path):
    for run_dir, rounds in (("whole", 4), ("split", 2), ("split", 4)):
        torch.manual_seed(0)
        fit(tmp_path / run_dir, LitClassifier(lr=0.1, optim="dict"), f"fed.rounds={rounds}")
    a = checkpoint.load(tmp_path / "whole" / "checkpoint.pt")
    b = checkpoint.load(tmp_path / "split" / "checkpoint.pt")

    def stable(history):
        return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in history]

    assert stable(a["history"]) == stable(b["history"])
    assert [h["train/lr"] for h in a["history"]] == [0.1, 0.05, 0.025, 0.0125]
    assert a["schedule"] == b["schedule"] and a["schedule"]["steps"] == 4
    for k, v in a["server"]["global"].items():
        assert torch.equal(v, b["server"]["global"][k]), k


@pytest.mark.parametrize("compressor", ["none", "fedbat", "topk", "qsgd", "signsgd", "ef_signsgd"])
def test_every_compressor_trains_a_user_module(tmp_path, compressor):
    summary = fit(tmp_path, None, f"compressor={compressor}", "compressor.downlink=none")
    assert summary["best_acc"] > 0.3, summary


def test_datasets_partitioned_by_label_or_natural_key(tmp_path):
    dm = DigitsDataModule()
    dm.setup()
    by_label = fedbat.fit(
        LitClassifier(),
        train_dataset=dm.train,
        test_dataset=dm.val,
        overrides=[*BASE, f"run_dir={tmp_path / 'label'}", "data.partition=label_count"],
        label_fn=lambda s: s["label"],
    )
    assert by_label["best_acc"] > 0.2
    # a natural key: one client per residue of the label mod 6 (6 clients)
    keyed = fedbat.fit(
        LitClassifier(),
        train_dataset=dm.train,
        test_dataset=dm.val,
        overrides=[*BASE, f"run_dir={tmp_path / 'key'}", "fed.clients_per_round=3"],
        client_key=lambda s: s["label"] % 6,
    )
    cfg = (tmp_path / "key" / "config.yaml").read_text()
    assert "num_clients: 6" in cfg and keyed["rounds"] == 3


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedbat.cli", "train", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


TARGETS = [
    "task._target_=tests.user_project.lit.LitClassifier",
    "datamodule._target_=tests.user_project.lit.DigitsDataModule",
]


@pytest.mark.slow
def test_cli_selects_task_and_datamodule_by_target_on_1_and_2_processes(tmp_path):
    common = [*TARGETS, *BASE, "+task.lr=0.5", "trainer.threads=1", "compressor=fedbat"]
    common += ["logger=wandb"]
    one = cli(*common, f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    two = cli(*common, "trainer.devices=2", f"hydra.run.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr
    a = checkpoint.load(tmp_path / "one" / "checkpoint.pt")["history"]
    b = checkpoint.load(tmp_path / "two" / "checkpoint.pt")["history"]
    drop = ("time/",)
    assert [{k: v for k, v in h.items() if not k.startswith(drop)} for h in a] == [
        {k: v for k, v in h.items() if not k.startswith(drop)} for h in b
    ]
    assert a[-1]["val_acc"] > 0.4
    (run_file,) = (tmp_path / "one" / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"val_acc" in run_file.read_bytes() and b"train_loss" in run_file.read_bytes()


@pytest.mark.slow
def test_cli_refuses_a_module_it_cannot_honour_in_one_line(tmp_path):
    out = cli(*TARGETS, *BASE, "+task.optim=two", f"hydra.run.dir={tmp_path / 'r'}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "fedbat: error: task: configure_optimizers gave 2 optimizer(s) (SGD, Adam); a federated "
        "client trains with exactly one torch.optim.Optimizer"
    ]


FIT_SCRIPT = """
import sys
import torch
import fedbat
sys.path.insert(0, {root!r})
from tests.user_project.lit import DigitsDataModule, LitClassifier

if __name__ == "__main__":
    torch.manual_seed(0)
    fedbat.fit(LitClassifier(lr=0.5, optim="dict"), DigitsDataModule(), overrides=sys.argv[1:])
"""


@pytest.mark.slow
def test_fit_from_a_script_on_2_processes_equals_1(tmp_path):
    """Fabric re-runs the user's script for rank 1, which joins the same fit."""
    script = tmp_path / "train_mine.py"
    script.write_text(FIT_SCRIPT.format(root=str(ROOT)))
    common = [*BASE, "trainer.threads=1", "compressor=ef_signsgd"]
    for devices in (1, 2):
        out = subprocess.run(
            [
                sys.executable,
                str(script),
                *common,
                f"trainer.devices={devices}",
                f"run_dir={tmp_path / str(devices)}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert out.returncode == 0, out.stderr
    a, b = (checkpoint.load(tmp_path / d / "checkpoint.pt") for d in ("1", "2"))
    drop = ("time/",)
    assert [{k: v for k, v in h.items() if not k.startswith(drop)} for h in a["history"]] == [
        {k: v for k, v in h.items() if not k.startswith(drop)} for h in b["history"]
    ]
    states = [clientstore.read(tmp_path / d, s) for d, s in (("1", a), ("2", b))]
    assert states[0].keys() == states[1].keys() != set()
    for k, v in a["server"]["global"].items():
        assert torch.equal(v, b["server"]["global"][k]), k


@pytest.mark.slow
def test_a_datamodule_without_a_task_fails_in_one_line(tmp_path):
    out = cli(TARGETS[1], *BASE, f"hydra.run.dir={tmp_path / 'r'}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "fedbat: error: datamodule._target_: the built-in classifier needs a registered "
        "dataset's input shape; give your LightningModule too (task._target_=...)"
    ]
    assert not (tmp_path / "r").exists()


def test_an_iid_split_needs_no_labels(tmp_path):
    """iid draws no labels: a dataset without ``targets`` or ``label_fn`` splits as if it had
    them (the same clients); the label partitions still ask for them, in one line."""
    from fedbat.datamodules.dataset import DatasetClients
    from tests.user_project.lit import DigitsDicts

    labelled = DigitsDicts(train=True)
    bare = torch.utils.data.StackDataset(labelled)  # the same samples, no targets
    ours = DatasetClients(bare, None, num_clients=5)
    theirs = DatasetClients(labelled, None, num_clients=5)
    assert all(torch.equal(a, b) for a, b in zip(ours.client_indices, theirs.client_indices,
                                                 strict=True))  # fmt: skip
    with pytest.raises(ConfigError, match="has no 'targets' to partition by label"):
        DatasetClients(bare, None, num_clients=5, partition_name="dirichlet")
