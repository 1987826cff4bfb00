"""Only what trains travels: a frozen backbone is sent once, in the model a client first
receives, never again in either direction, and no compressor (FedBAT included) touches it."""

import csv

import pytest
import torch

import fedbat
import fedbat.compressors as C
from fedbat import checkpoint
from fedbat.compressors import TensorSpec
from fedbat.strategies import STRATEGIES
from tests.user_project.lit import DigitsDataModule, FrozenBackbone

# what trains (by hand, not from the plan): the head, and the BatchNorm statistics, which
# move in train mode although the backbone's parameters are frozen
TRAVEL = [
    TensorSpec("backbone.2.running_mean", torch.Size([256]), torch.float32, False),
    TensorSpec("backbone.2.running_var", torch.Size([256]), torch.float32, False),
    TensorSpec("backbone.2.num_batches_tracked", torch.Size([]), torch.int64, False),
    TensorSpec("head.weight", torch.Size([10, 256]), torch.float32, True),
    TensorSpec("head.bias", torch.Size([10]), torch.float32, False),
]
FROZEN = ["backbone.1.weight", "backbone.1.bias", "backbone.2.weight", "backbone.2.bias",
          "backbone.4.weight", "backbone.4.bias", "scale"]  # fmt: skip
CLIENTS = ["data.num_clients=4", "fed.clients_per_round=4"]  # all: round 2 sends no full model


def packet_bits(name: str) -> int:
    """Bits of one packet of the hand-listed travelling tensors (sizes do not depend on the
    values for these compressors)."""
    update = {s.name: torch.zeros(s.shape, dtype=s.dtype) for s in TRAVEL}
    return C.encode_update(update, TRAVEL, C.build(name), torch.Generator()).bits


def fit(tmp_path, *overrides):
    torch.manual_seed(0)
    module = FrozenBackbone()
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    args = ["fed.rounds=2", "progress=false", *CLIENTS, f"run_dir={tmp_path}", *overrides]
    fedbat.fit(module, DigitsDataModule(), overrides=args)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    final = checkpoint.load(tmp_path / "checkpoint.pt")["server"]["global"]
    return initial, final, rows


def check(initial, final, rows, up, down, scaffold=False):
    for name in FROZEN:
        assert torch.equal(final[name], initial[name]), name  # bitwise, never moved
    assert not torch.equal(final["backbone.2.running_mean"], initial["backbone.2.running_mean"])
    assert not torch.equal(final["head.weight"], initial["head.weight"])
    extra = 2 if scaffold else 1  # SCAFFOLD's control variates: another plan's worth
    assert int(rows[1]["bits/uplink"]) == 4 * packet_bits(up) * extra or scaffold
    assert int(rows[1]["bits/downlink"]) == 4 * packet_bits(down) * extra or scaffold


@pytest.mark.parametrize("compressor", C.available())
def test_frozen_tensors_never_move_nor_travel_under_every_compressor(tmp_path, compressor):
    initial, final, rows = fit(tmp_path, f"compressor={compressor}")
    check(initial, final, rows, compressor, compressor)
    # round 1: every client is sent the whole model once, frozen tensors included
    whole = sum(t.numel() * t.element_size() * 8 for t in initial.values())
    assert int(rows[0]["bits/downlink"]) > 4 * whole


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES.available() if s != "fedavg"])
def test_frozen_tensors_never_move_under_every_strategy(tmp_path, strategy):
    clock = ["system.compute_s_per_sample=0.01", "strategy.buffer_size=4"]  # asynchronous
    clock = clock if strategy == "fedbuff" else []
    initial, final, rows = fit(tmp_path, "compressor=fedbat", f"strategy={strategy}", *clock)
    check(initial, final, rows, "fedbat", "fedbat", scaffold=strategy == "scaffold")


def test_the_run_says_what_travels(tmp_path, capsys):
    fit(tmp_path, "compressor=none")
    assert "fedbat: 5 tensors travel (3,083 elements, 1 compressed); 7 frozen stay (83,2" in (
        capsys.readouterr().out
    )


def test_a_frozen_buffer_that_changes_later_is_refused_by_name(tmp_path):
    """A buffer the first training step leaves alone but a later one changes would lose its
    change silently: the client refuses, naming it and the fix."""

    class Late(FrozenBackbone):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                self.scale += 1.0
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    with pytest.raises(fedbat.errors.ConfigError, match=r"task: scale changed in local "
                       r"training although it is frozen .* policy.travel=\[scale\]"):  # fmt: skip
        fedbat.fit(Late(), DigitsDataModule(), overrides=["fed.rounds=1", f"run_dir={tmp_path}"])
    torch.manual_seed(0)
    fedbat.fit(Late(), DigitsDataModule(), overrides=[
        "fed.rounds=1", f"run_dir={tmp_path / 'ok'}", "policy.travel=[scale]"])  # fmt: skip
