"""SLURM pre-emption: ``#SBATCH --signal=USR1@<seconds>`` asks a job to stop before its time
limit. fedbat finishes the round in progress, checkpoints it, and requeues the job, which
resumes from that checkpoint in its next allocation (as Lightning's Trainer does)."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning.fabric import Fabric


class StopRequest:
    """Set by SIGUSR1; the loop stops after the round in progress once any rank has it.
    Light on purpose: the CLI installs it before importing torch, so a signal that comes
    while a job starts is not fatal (SIGUSR1's default action kills the process)."""

    def __init__(self) -> None:
        self.asked = False

    def __call__(self, signum: int, frame: object) -> None:
        self.asked = True

    def agreed(self, fabric: Fabric) -> bool:
        """Whether any rank was asked to stop (every rank gets the same answer)."""
        if fabric.world_size == 1:
            return self.asked
        import torch

        flag = torch.tensor([int(self.asked)], device=fabric.device)
        return bool(fabric.all_reduce(flag, reduce_op="sum").item() > 0)


STOP = StopRequest()


def listen() -> None:
    """Catch SIGUSR1 from now on (SLURM's ``--signal=USR1@<seconds>``)."""
    signal.signal(signal.SIGUSR1, STOP)


def job_id() -> str | None:
    """The id ``scontrol`` knows this job by (``<array job>_<task>`` for a job array)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def requeue(rank_zero: bool) -> str:
    """Requeue this job (rank 0 does); returns what happened, as the end of a sentence. The
    requeue terminates the job's processes, so every rank ignores SIGTERM from then on: it
    is leaving anyway, with the checkpoint written."""
    job = job_id()
    if job is None:
        return "not a SLURM job: rerun the same command to resume"
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not rank_zero:
        return "rank 0 requeues the job"
    try:
        out = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"could not requeue SLURM job {job} ({err}): resubmit it to resume"
    if out.returncode != 0:
        why = " ".join((out.stderr or out.stdout).split())[:200]
        return f"could not requeue SLURM job {job} ({why}): resubmit it to resume"
    return f"requeued SLURM job {job}; it resumes from there"
