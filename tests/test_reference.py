"""The built-in path against metrics recorded before the engine took any LightningModule:
the same results within a tolerance that holds on any CPU (float sums may differ in the
last bits between kernel paths; a test sample near the decision boundary may flip). The
bits were re-recorded when each client started being sent what it missed, and for packet
format v2 (a smaller container): training did not change."""

import json
from pathlib import Path

import pytest

from fedbat import checkpoint
from fedbat.lifecycle import run
from tests.conftest import make_cfg

REFERENCE = json.loads((Path(__file__).parent / "data" / "reference_metrics.json").read_text())


@pytest.mark.parametrize("case", sorted(REFERENCE))
def test_builtin_results_unchanged(tmp_path, case):
    ref = REFERENCE[case]
    run(make_cfg(tmp_path, *ref["overrides"], "trainer.threads=1"))
    history = checkpoint.load(tmp_path / "checkpoint.pt")["history"]
    assert len(history) == len(ref["rounds"])
    for got, want in zip(history, ref["rounds"], strict=True):
        assert got["bits/uplink"] == want["bits/uplink"]
        assert got["bits/downlink"] == want["bits/downlink"]
        for key in ("train/loss", "test/loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-3), (key, got["round"])
        assert got["test/acc"] == pytest.approx(want["test/acc"], abs=0.01)
