"""The README's commands run as a user would type them.

Every line of every ``bash`` block is accounted for: run here as written (in a fresh folder,
with ``FEDBAT_MAX_ROUNDS=1`` so that a 30-round job takes one round), found verbatim in
``.ci/run`` (which runs it), found verbatim in the file it is an excerpt of, or listed below
with the reason it cannot run on this machine. A new README command fails
``test_every_readme_command_is_accounted_for`` until it is one of these.
"""

import glob
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()

NOT_HERE = {  # command: why it cannot run here
    "wandb sync runs/*/*/wandb/offline-run-*": "uploads to W&B: this machine has no network",
    "fedbat train trainer.accelerator=gpu trainer.devices=1": "needs a GPU (none here)",
    "fedbat train trainer.accelerator=gpu trainer.devices=4": "needs 4 GPUs",
    "torchrun --nproc_per_node=4 -m fedbat.cli train trainer.accelerator=gpu trainer.devices=4": (
        "needs 4 GPUs"
    ),
    "fedbat fedscale-trace client_device_capacity client_behave_trace --clients 100 -o traces": (
        "needs FedScale's trace files (not downloadable here); tests/test_devices.py converts "
        "pickles of the same format"
    ),
    "fedbat train system.trace=traces/trace.csv system.availability=traces/availability.csv "
    "data.num_clients=100": "needs the CSVs the command above writes",
    "sbatch examples/slurm/train.sbatch": "needs a SLURM cluster with GPUs; tests/test_slurm.py "
    "submits examples/slurm/train_cpu.sbatch to a real one",
}
INSTALLS = ("pip install torch==2.13.0", "pip install -e .", 'pip install -e ".[flower]"')
EXCERPTS = {"examples/slurm/train_cpu.sbatch"}  # blocks that show part of a file


def commands(text: str) -> list[str]:
    """Shell lines: continuation lines joined, comments dropped."""
    lines = re.sub(r"\\\n\s*", "", text).splitlines()
    stripped = [re.sub(r"\s+#\s.*$", "", line).strip() for line in lines]
    return [c for c in stripped if c and not c.startswith("#")]


def blocks() -> list[list[str]]:
    """Each bash block's commands."""
    return [commands(body) for body in re.findall(r"```bash\n(.*?)```", README, re.S)]


def across() -> list[str]:
    """The block of "Across machines": Flower's own commands, with the SuperLink and the
    SuperNodes running as they do on their machines (test_flower_deployment.py runs it)."""
    (block,) = [b for b in blocks() if any(c.startswith("flower-superlink") for c in b)]
    return block


def how(command: str) -> str:
    """``run``, ``ci`` (.ci/run has it verbatim), ``excerpt``, ``across`` or the reason it is
    not run."""
    if command in CI:
        return "ci"
    if command in across():
        return "across"
    if any(command in commands((ROOT / f).read_text()) for f in EXCERPTS):
        return "excerpt"
    if command in NOT_HERE:
        return NOT_HERE[command]
    parts = command.split(" && ")
    runs = ("fedbat ", "python ", 'eval "$(fedbat ')
    if all(p in INSTALLS or p.startswith(runs) for p in parts):
        return "run"
    return ""


def test_every_readme_command_is_accounted_for():
    unknown = [c for b in blocks() for c in b if not how(c)]
    assert not unknown, f"README commands neither run, in .ci/run, nor excused: {unknown}"
    assert sum(how(c) == "run" for b in blocks() for c in b) >= 15


def runnable(block: list[str]) -> bool:
    return any(how(c) == "run" and c not in INSTALLS for c in block)


# Flower deployments run in .ci/run's Flower step (tests/test_flower_deployment.py)
RUN_BLOCKS = [b for b in blocks() if runnable(b) and not any("fedbat flower" in c for c in b)]


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[b[0][:40] for b in RUN_BLOCKS])
def test_readme_block_runs_as_written(tmp_path, block):
    run_block(tmp_path, block)


def run_block(tmp_path: Path, block: list[str]) -> None:
    """The block's commands in order, in one fresh folder (a later command reads what an
    earlier one wrote: ``multirun/<date>/`` is the sweep the block made). Installs are
    .ci/run's (a fresh clone installs ``.[dev]``, a superset, the same way)."""
    if any("data=fmnist" in c or "experiment=fmnist" in c for c in block):
        from tests.conftest import FMNIST_ROOT

        if not (FMNIST_ROOT / "train-images-idx3-ubyte.gz").is_file():
            pytest.skip("FMNIST not installed (apt-get install dataset-fashion-mnist)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "FEDBAT_"))}
    env |= {"FEDBAT_MAX_ROUNDS": "1", "HOME": str(tmp_path), "WANDB_DIR": str(tmp_path)}
    env["PYTHONPATH"] = str(ROOT)
    for command in block:
        if how(command) != "run" or command in INSTALLS:
            continue
        command = " && ".join(p for p in command.split(" && ") if p not in INSTALLS)
        if "<date>" in command:
            (sweep,) = glob.glob(str(tmp_path / "multirun" / "*"))
            command = command.replace("multirun/<date>", sweep)
        command = re.sub(r"^python ", f"{sys.executable} ", command)
        command = command.replace("examples/", f"{ROOT}/examples/")
        out = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, (command, out.stdout[-2000:], out.stderr[-2000:])
        assert "Traceback" not in out.stderr, (command, out.stderr[-2000:])


@pytest.mark.slow
def test_readme_lightning_example_runs(tmp_path):
    section = README.split("## Your own LightningModule and LightningDataModule")[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "my_fl.py"
    script.write_text(code)
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "'final_acc': 0." in out.stdout and "'monitor': 'val_acc'" in out.stdout
    (metrics,) = (tmp_path / "runs" / "LitClassifier").glob("*/metrics.csv")
    assert "val_acc" in metrics.read_text().splitlines()[0]
