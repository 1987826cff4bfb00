"""Validation and test as Lightning users expect: ``validation_step`` on the validation data,
``test_step`` on the test data, every ``fed.eval_every`` rounds; ``monitor=auto`` picks
what the module logs, and a monitor never logged says so."""

import json

import pytest
import torch
from torch.utils.data import Subset

import fedbat
from tests.helpers import rows
from tests.user_project.lit import DigitsDicts, DigitsThreeWay, DocsClassifier, LitClassifier

BASE = ["fed.rounds=3", "fed.clients_per_round=5", "data.num_clients=10", "progress=false"]


def fit(tmp_path, module, data=None, *overrides, **kw):
    torch.manual_seed(0)
    args = [*BASE, f"run_dir={tmp_path}", *overrides]
    return fedbat.fit(module, data, overrides=args, **kw)


def test_validation_and_test_both_run_every_eval_every_rounds(tmp_path, capsys):
    module = DocsClassifier(lr=0.5)
    summary = fit(tmp_path, module, DigitsThreeWay(), "fed.eval_every=2")
    r = rows(tmp_path)
    assert [bool(x["val_acc"]) for x in r] == [False, True, True]  # round 2, and the last
    assert [bool(x["test_acc"]) for x in r] == [False, True, True]
    # 180 validation and 180 test samples, in one batch of 256 each, per evaluation
    assert module.validated == module.tested == 2
    assert summary["monitor"] == "val_acc"  # monitor=auto: the first validation metric
    assert summary["final_acc"] == pytest.approx(float(r[-1]["val_acc"]))
    assert summary["best_acc"] == max(float(x["val_acc"]) for x in r if x["val_acc"])
    assert summary["final_acc"] > 0.4
    assert json.loads((tmp_path / "summary.json").read_text())["monitor"] == "val_acc"
    assert "never logged" not in capsys.readouterr().out


def test_val_and_test_metrics_are_measured_on_their_own_data(tmp_path):
    """The validation half and the test half of the held-out digits give different values:
    each step ran on its own loader (checked against a hand evaluation of the final model)."""
    module = DocsClassifier(lr=0.5)
    fit(tmp_path, module, DigitsThreeWay())
    r = rows(tmp_path)[-1]
    module.eval()
    held = DigitsDicts(train=False)
    half = len(held) // 2
    for key, idx in (("val_acc", range(half)), ("test_acc", range(half, len(held)))):
        x = torch.stack([held[i]["image"] for i in idx])
        y = torch.tensor([held[i]["label"] for i in idx])
        with torch.no_grad():
            acc = (module(x).argmax(1) == y).float().mean().item()
        assert float(r[key]) == pytest.approx(acc, abs=1e-6), key


def test_fit_takes_a_val_dataset(tmp_path):
    held = DigitsDicts(train=False)
    val = Subset(held, range(100))
    summary = fit(
        tmp_path,
        DocsClassifier(lr=0.5),
        None,
        train_dataset=DigitsDicts(train=True),
        val_dataset=val,
    )
    r = rows(tmp_path)
    assert r[-1]["val_acc"] and "test_acc" not in r[-1]  # no test data: test_step skipped
    assert summary["monitor"] == "val_acc"


def test_auto_monitor_of_a_loss_reports_its_minimum(tmp_path):
    """LitClassifier logs val_loss first: auto picks it, and a loss is best at its lowest."""
    summary = fit(tmp_path, LitClassifier(lr=0.5), DigitsThreeWay())
    losses = [float(x["val_loss"]) for x in rows(tmp_path)]
    assert summary["monitor"] == "val_loss"
    assert summary["best_acc"] == pytest.approx(min(losses))
    assert summary["final_acc"] == pytest.approx(losses[-1])


def test_a_monitor_never_logged_says_so_with_the_keys_that_were(tmp_path, capsys):
    summary = fit(tmp_path, DocsClassifier(lr=0.5), DigitsThreeWay(), "monitor=val/acc")
    assert summary["final_acc"] is None
    out = capsys.readouterr().out
    assert (
        "fedbat: monitor='val/acc' was never logged, so the summary has no final or best "
        "value; logged: test_acc, train/loss, train_loss, val_acc (set monitor=<one of them>)"
    ) in out


def test_auto_monitor_resolves_the_same_after_a_resume(tmp_path):
    fit(tmp_path, DocsClassifier(lr=0.5), DigitsThreeWay(), "fed.rounds=2")
    summary = fit(tmp_path, DocsClassifier(lr=0.5), DigitsThreeWay(), "fed.rounds=2")
    assert summary["monitor"] == "val_acc" and summary["final_acc"] is not None
