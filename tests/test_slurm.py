"""The cluster path under a real SLURM (slurmctld + slurmd on this machine): the example
job equals 1 process, a requeue resumes bitwise, SIGUSR1 before the time limit requeues
without losing a round, and a job killed at its time limit resumes when resubmitted.

They run with FEDBAT_SLURM_TESTS=1 (``.ci/run`` starts the cluster with
``../shared/tools/local-slurm start`` and runs this file so, after the suite) and fail there
if SLURM does not answer; otherwise they skip with the reason, so that the suite stays fast:
the jobs wait on SLURM's timers for about 3 minutes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedbat import checkpoint
from fedbat.lifecycle import run
from tests import slurm_jobs
from tests.conftest import make_cfg
from tests.helpers import assert_same_run

REASON = slurm_jobs.reason_to_skip()
pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """1-process references of the scenarios' configs (equal trainer.threads)."""
    base = tmp_path_factory.mktemp("one")
    for name, rounds in slurm_jobs.ROUNDS.items():
        run(make_cfg(base / name, *slurm_jobs.PACED, f"fed.rounds={rounds}", "trainer.threads=1"))
    return base


def test_sbatch_job_of_two_tasks_equals_one_process(one_process):
    out = slurm_jobs.result("equal")
    assert out["info"]["JobState"] == "COMPLETED", out["info"]
    log = slurm_jobs.output(out["run_dir"])
    assert "MEMBER: 2/2" in log  # srun's two tasks formed one job
    assert_same_run(one_process / "equal", out["run_dir"])


def test_scontrol_requeue_mid_run_resumes_bitwise(one_process):
    out = slurm_jobs.result("requeued")
    info, log = out["info"], slurm_jobs.output(out["run_dir"])
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, info
    done = int(re.search(r"resuming \S+ after round (\d+) of 12", log).group(1))
    assert 2 <= done < 12 and "interrupted (SIGTERM)" in log
    assert_same_run(one_process / "equal", out["run_dir"])


def test_sigusr1_before_the_time_limit_requeues_and_loses_no_round(one_process):
    out = slurm_jobs.result("preempted")
    info, log = out["info"], slurm_jobs.output(out["run_dir"])
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, info
    stops = re.findall(r"SIGUSR1: stopped after round (\d+), checkpointed; requeued SLURM job", log)
    resumes = re.findall(r"resuming \S+ after round (\d+) of 60", log)
    assert stops and sorted(set(stops)) == sorted(set(resumes)), (stops, resumes)
    assert "Traceback" not in log
    assert_same_run(one_process / "preempted", out["run_dir"])


def test_a_job_killed_at_its_time_limit_resumes_when_resubmitted(one_process):
    out = slurm_jobs.result("timed_out")
    assert out["first"]["JobState"] == "TIMEOUT", out["first"]
    assert out["second"]["JobState"] == "COMPLETED", out["second"]
    log = slurm_jobs.output(out["run_dir"])
    kept = re.search(r"interrupted \(SIGTERM\); the checkpoint after round (\d+) is intact", log)
    assert kept and f"resuming {out['run_dir']} after round {kept.group(1)} of 100" in log
    assert int(kept.group(1)) == out["killed_at"]  # every logged round was kept
    assert_same_run(one_process / "timed_out", out["run_dir"])
    assert checkpoint.load(out["run_dir"] / "checkpoint.pt")["round"] == 100


def test_a_submitit_sweep_submits_one_job_per_configuration():
    out = slurm_jobs.result("sweep")
    assert out["proc"].returncode == 0, out["proc"].stderr[-2000:]
    sweep = out["sweep_dir"]
    assert len(list((sweep / ".submitit").glob("*_[0-3]"))) == 4  # SLURM jobs, not local
    runs = sorted(p.parent for p in sweep.rglob("summary.json"))
    assert len(runs) == 4
    cfgs = [OmegaConf.load(r / "config.yaml") for r in runs]
    assert {(c.compressor.name, c.seed) for c in cfgs} == {
        (n, s) for n in ("none", "fedbat") for s in (0, 1)
    }
    assert all(Path(c.run_dir) == r for c, r in zip(cfgs, runs, strict=True))
    groups = {c.logger.wandb.group for c in cfgs}  # seeds aggregate, compressors never
    assert groups == {"compressor=none,fed.rounds=2", "compressor=fedbat,fed.rounds=2"}
    assert all(list(c.logger.wandb.tags) == ["sweep-sweep"] for c in cfgs)


def test_a_job_on_two_nodes_equals_one_process(one_process):
    """Two slurmd daemons on this host are two nodes to SLURM (their names, n1 and n2, are
    not host names, so the job is told MASTER_ADDR=127.0.0.1)."""
    out = slurm_jobs.result("two_nodes")
    assert out["sbatch"].returncode == 0, out["sbatch"].stderr
    log = slurm_jobs.output(out["run_dir"])
    assert "MEMBER: 2/2" in log
    assert_same_run(one_process / "equal", out["run_dir"])
