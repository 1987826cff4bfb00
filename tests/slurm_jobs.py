"""Jobs on a real SLURM cluster (``../shared/tools/local-slurm start`` runs one on this
machine). They are submitted in the background when the session starts (``conftest.py``),
so that their waiting (time limits, requeues) overlaps the rest of the suite; the tests in
``test_slurm.py`` collect their outcomes."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "slurm" / "train_cpu.sbatch"
FINAL = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY"}

# The jobs' config and their 1-process references' (trainer.threads=1 is what the example
# sets from --cpus-per-task): a user's LightningModule and DataModule, whose steps sleep
# $FEDBAT_TEST_PACE s where a job must last (the CPU stays free for the other tests), with
# error-feedback state.
PACED = [
    "task._target_=tests.user_project.lit.PacedClassifier",
    "datamodule._target_=tests.user_project.lit.DigitsDataModule",
    "fed.clients_per_round=2",
    "compressor=ef_signsgd",
]
PACE = "0.3"  # 3 steps a round: at least 0.9 s a round
ROUNDS = {"equal": 12, "preempted": 60, "timed_out": 100}

_futures: dict[str, Future] = {}
_jobs: list[str] = []
_stopping = threading.Event()


def reason_to_skip() -> str | None:
    """Why the SLURM tests do not run here (None: they do)."""
    if not os.environ.get("FEDBAT_SLURM_TESTS"):
        return (
            "SLURM tests run with FEDBAT_SLURM_TESTS=1 against a running cluster "
            "(../shared/tools/local-slurm start), as .ci/run does"
        )
    if problem := unavailable():
        raise RuntimeError(f"FEDBAT_SLURM_TESTS=1 but {problem}")
    return None


def unavailable() -> str | None:
    """Why SLURM cannot be used here, or None."""
    if shutil.which("sbatch") is None:
        return "no SLURM here (sbatch not found); ../shared/tools/local-slurm start runs one"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"SLURM does not answer ({err})"
    states = out.stdout.split()  # idle, mixed, allocated, completing: usable; down: not
    if out.returncode or not any(not s.startswith(("down", "drain", "fail")) for s in states):
        return f"no SLURM node is up (sinfo: {(out.stdout + out.stderr).strip()[:100]!r})"
    return None


def job_env(**extra: str) -> dict[str, str]:
    """This environment without SLURM's job variables (the suite may itself run in a job),
    with the repository importable (``tests.user_project``) and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return env | {"PYTHONPATH": str(REPO), **extra}


def sbatch(
    script: Path, args: list[str], run_dir: Path, options: list[str] = (), pace: str = "0"
) -> str:
    """Submit ``script`` with fedbat overrides ``args``; returns the job id."""
    if _stopping.is_set():
        raise RuntimeError("the session is over")
    run_dir.parent.mkdir(parents=True, exist_ok=True)  # the job's output goes there
    env = job_env(RUN_DIR=str(run_dir), FEDBAT_TEST_PACE=pace)
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--oversubscribe",  # the scenarios share the node's 2 cores
            f"--chdir={REPO}",
            f"--output={run_dir.parent}/job-%j.out",
            *options,
            str(script),
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    job = out.stdout.strip().split(";")[0]
    _jobs.append(job)
    return job


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
    return dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)


def wait_done(job: str, limit: float) -> dict[str, str]:
    """Wait for the job's final state. A requeued job waits ``cred_expire`` (2 min) before
    it may start again; it is let start at once, as an idle cluster would."""
    end = time.time() + limit
    while time.time() < end and not _stopping.is_set():
        info = job_info(job)
        if info.get("JobState") in FINAL:
            return info
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
        time.sleep(0.5)
    raise TimeoutError(f"job {job} not done in {limit} s: {job_info(job)}")


def rows(run_dir: Path) -> int:
    try:
        with open(run_dir / "metrics.csv") as f:
            return sum(1 for _ in csv.DictReader(f))
    except FileNotFoundError:
        return 0


def output(run_dir: Path) -> str:
    return "".join(p.read_text() for p in sorted(run_dir.parent.glob("job-*.out")))


def equal(base: Path) -> dict[str, Any]:
    """The example job, 2 tasks, left alone."""
    run_dir = base / "equal" / "run"
    args = [*PACED, f"fed.rounds={ROUNDS['equal']}"]
    return {"info": wait_done(sbatch(EXAMPLE, args, run_dir), 300), "run_dir": run_dir}


def requeued(base: Path) -> dict[str, Any]:
    """The example job, requeued by ``scontrol requeue`` once 2 rounds are logged."""
    run_dir = base / "requeued" / "run"
    job = sbatch(EXAMPLE, [*PACED, f"fed.rounds={ROUNDS['equal']}"], run_dir, pace=PACE)
    end = time.time() + 300
    while rows(run_dir) < 2 and time.time() < end and not _stopping.is_set():
        time.sleep(0.1)
    subprocess.run(["scontrol", "requeue", job], check=True)
    return {"info": wait_done(job, 300), "run_dir": run_dir, "requeued_at": rows(run_dir)}


def preempted(base: Path) -> dict[str, Any]:
    """A 1-minute time limit with SIGUSR1 50 s before it: the job needs several
    allocations, and requeues itself at the end of each."""
    run_dir = base / "preempted" / "run"
    options = ["--time=1", "--signal=USR1@50"]
    job = sbatch(EXAMPLE, [*PACED, f"fed.rounds={ROUNDS['preempted']}"], run_dir, options, PACE)
    return {"info": wait_done(job, 600), "run_dir": run_dir}


def timed_out(base: Path) -> dict[str, Any]:
    """A job without the signal, killed at its 1-minute time limit, then resubmitted."""
    run_dir = base / "timed_out" / "run"
    script = base / "timed_out" / "no_signal.sbatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    lines = EXAMPLE.read_text().splitlines()
    script.write_text("\n".join(x for x in lines if not x.startswith("#SBATCH --signal")) + "\n")
    args = [*PACED, f"fed.rounds={ROUNDS['timed_out']}"]  # ~90 s at the pace: past 1 min
    first = wait_done(sbatch(script, args, run_dir, ["--time=1"], PACE), 400)
    killed_at = rows(run_dir)
    second = wait_done(sbatch(script, args, run_dir, ["--time=10"]), 300)
    return {"first": first, "second": second, "run_dir": run_dir, "killed_at": killed_at}


def sweep(base: Path) -> dict[str, Any]:
    """``fedbat train --multirun hydra/launcher=submitit_slurm``: one job per configuration."""
    sweep_dir = base / "sweep"
    cmd = [sys.executable, "-m", "fedbat.cli", "train", "--multirun"]
    cmd += ["hydra/launcher=submitit_slurm", "hydra.launcher.timeout_min=10"]
    cmd += ["compressor=none,fedbat", "seed=0,1", "fed.rounds=2", "logger=wandb"]
    cmd += [f"hydra.sweep.dir={sweep_dir}", "progress=false"]
    env = job_env(WANDB_MODE="offline", WANDB_DIR=str(base))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=base)
    return {"proc": done, "sweep_dir": sweep_dir}


TWO_NODE_CONF = """ClusterName=two{port}
SlurmctldHost={host}
SlurmctldPort={port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmdSpoolDir={d}/spool-%n
StateSaveLocation={d}/state
SlurmUser=root
SlurmdUser=root
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
NodeName=n1 NodeHostname={host} Port={n1_port} CPUs=1 RealMemory=1000
NodeName=n2 NodeHostname={host} Port={n2_port} CPUs=1 RealMemory=1000
PartitionName=main Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


def two_nodes(base: Path) -> dict[str, Any]:
    """A second cluster of two nodes, two slurmd daemons on this host (Debian's slurmd runs
    several with ``-N``), and the example job on 2 nodes x 1 task."""
    d = base / "two_nodes"
    (d / "state").mkdir(parents=True)
    port = 20000 + os.getpid() % 10000
    conf = d / "slurm.conf"
    conf.write_text(
        TWO_NODE_CONF.format(
            host=socket.gethostname(),
            d=d,
            port=port,
            slurmd_port=port + 1,
            n1_port=port + 2,
            n2_port=port + 3,
        )
    )
    env = job_env(SLURM_CONF=str(conf))
    try:
        subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True, timeout=30)
        for node in ("n1", "n2"):
            subprocess.run(["slurmd", "-f", str(conf), "-N", node], env=env, check=True, timeout=30)
        end = time.time() + 60
        while time.time() < end and not _stopping.is_set():
            out = subprocess.run(["sinfo", "-h", "-o", "%D %T"], env=env, capture_output=True)
            if out.stdout.decode().split() == ["2", "idle"]:
                break
            time.sleep(0.5)
        run_dir = d / "run"
        job = subprocess.run(
            [
                "sbatch",
                "--wait",
                "--nodes=2",
                "--ntasks-per-node=1",
                "--cpus-per-task=1",
                f"--output={d}/job-%j.out",
                f"--chdir={REPO}",
                str(EXAMPLE),
                *PACED,
                f"fed.rounds={ROUNDS['equal']}",
            ],
            env=env | {"RUN_DIR": str(run_dir), "MASTER_ADDR": "127.0.0.1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        return {"sbatch": job, "run_dir": run_dir}
    finally:
        for pid in d.glob("*.pid"):
            subprocess.run(["kill", pid.read_text().strip()], capture_output=True)


SCENARIOS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "equal": equal,
    "requeued": requeued,
    "preempted": preempted,
    "timed_out": timed_out,
    "sweep": sweep,
    "two_nodes": two_nodes,
}


def start() -> None:
    """Start every scenario in the background (once), when SLURM is here."""
    if _futures or reason_to_skip():
        return
    base = Path(tempfile.mkdtemp(prefix="fedbat-slurm-"))
    for name, scenario in SCENARIOS.items():
        _futures[name] = Future()
        threading.Thread(target=_run, args=(_futures[name], scenario, base), daemon=True).start()


def _run(future: Future, scenario: Callable[[Path], dict[str, Any]], base: Path) -> None:
    try:
        future.set_result(scenario(base))
    except BaseException as err:  # the test that asks for it reports it
        future.set_exception(err)


def result(name: str) -> dict[str, Any]:
    start()
    return _futures[name].result(timeout=900)


def cancel_all() -> None:
    """Cancel what is still queued or running (an interrupted session leaves nothing)."""
    _stopping.set()
    if _jobs:
        subprocess.run(["scancel", *_jobs], capture_output=True)
