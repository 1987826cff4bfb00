"""``fedbat flower``: a real local Flower deployment of a fedbat job, started and torn down.

A SuperLink and N SuperNodes run as separate processes on 127.0.0.1 (SuperNode i serves
fedbat client i); ``flwr run`` submits the fedbat Flower app (``server_app`` and
``client_app``) with the job's resolved config, and the ServerApp writes the same run dir as
``fedbat train``. Every process is stopped at the end, on an error and on SIGTERM / Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig

from fedbat.checkpoint import CHECKPOINT
from fedbat.config import run_name
from fedbat.integrations.flower import prepare
from fedbat.integrations.flower.app import ERROR_FILE, write_app
from fedbat.integrations.flower.node_state import node_states
from fedbat.integrations.flower.processes import Deployment, Watch, tail
from fedbat.integrations.flower.security import Credentials, generate
from fedbat.rundir import SUMMARY, RunDirLock


class Stop(Exception):
    """SIGTERM while the deployment runs."""


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="fedbat flower",
        description="Run a fedbat job on a local Flower deployment (SuperLink + SuperNodes "
        "on 127.0.0.1); the other arguments are `fedbat train` overrides.",
    )
    parser.add_argument("--supernodes", type=int, default=3, help="clients, one SuperNode each")
    parser.add_argument(
        "--round-timeout", type=float, default=600.0, help="seconds to wait for replies"
    )
    parser.add_argument(
        "--credentials",
        type=Path,
        help="a folder of TLS certificates and SuperNode keys (written there when it is empty "
        "or new; default: a throw-away set for this deployment)",
    )
    parser.add_argument(
        "--node-data",
        type=Path,
        help="SuperNode i trains on DIR/node-<i> alone (node config data-root), and the server "
        "reads only its evaluation data (the job's data=...)",
    )
    parser.add_argument(
        "--cold-clients",
        action="store_true",
        help="start every ClientApp and the ServerApp as a fresh process, as Flower does "
        "(default: forks of a warm server that imported the stack once)",
    )
    prepare.add_arguments(parser)
    return parser.parse_known_args(argv)


def job_config(overrides: list[str], supernodes: int) -> DictConfig:
    """The resolved job: ``fedbat train``'s config with one client per SuperNode (and at
    most all of them a round unless ``fed.clients_per_round`` is given), and a run dir under
    ``runs/flower/`` unless ``run_dir`` is given."""
    from fedbat.compose import compose
    from fedbat.config import cap_rounds

    cfg = compose(overrides)
    cap_rounds(cfg)
    if cfg.data.num_clients != supernodes and any(
        o.startswith("data.num_clients=") for o in overrides
    ):
        from fedbat.errors import ConfigError

        raise ConfigError(
            f"data.num_clients={cfg.data.num_clients}: a deployment has one client per "
            f"SuperNode; leave it out or set --supernodes {cfg.data.num_clients}"
        )
    cfg.data.num_clients = supernodes
    if not any(o.startswith("fed.clients_per_round=") for o in overrides):
        cfg.fed.clients_per_round = min(cfg.fed.clients_per_round, supernodes)
    if cfg.run_dir is None:
        kept = [o for o in overrides if not o.startswith("data.num_clients")]
        name = f"{cfg.data.name}_{cfg.model.name}_{cfg.compressor.name}"
        cfg.run_dir = str(Path("runs", "flower", name, run_name(kept)))
    cfg.run_dir = str(Path(cfg.run_dir).resolve())
    if "'" in cfg.run_dir:  # the nodes' state-dirs are in it, and node configs quote with '
        from fedbat.errors import ConfigError

        raise ConfigError(f"run_dir={cfg.run_dir}: a path with a quote (') cannot be deployed")
    cfg.progress = False  # the ServerApp's output is Flower's log stream, not a terminal
    return cfg


def preflight(cfg: DictConfig, node_data: Path | None = None) -> RunDirLock:
    """Everything the ServerApp would find wrong, found before any process starts: the run
    dir (unwritable, held by another run, a checkpoint of another job) and the job itself
    (its data, partition, task and training step are built once here). Returns the run
    dir's lock, which the launcher holds for the whole deployment; a dir created only for
    this check is removed again. With ``node_data``, the server's data is its evaluation data
    alone and each node's folder must hold its training data."""
    from fedbat import rundir
    from fedbat.assembly import build_datamodule, build_plan, build_task
    from fedbat.errors import ConfigError
    from fedbat.integrations.flower.node_data import node_data as own_data
    from fedbat.integrations.flower.node_data import server_data
    from fedbat.lifecycle import resume_state
    from fedbat.optimization import ServerSchedule

    run_dir = Path(cfg.run_dir)
    created = not run_dir.exists()
    rundir.prepare(run_dir)
    lock = rundir.RunDirLock(run_dir)
    try:
        lock.acquire()
        resume_state(cfg, run_dir)
        data = server_data(cfg, {}) if node_data else build_datamodule(cfg)
        for i in range(cfg.data.num_clients if node_data else 0):  # as node i will read it
            own_data({"partition-id": i, "data-root": str(node_data / f"node-{i}")}, cfg)
        task = build_task(cfg, data)
        ServerSchedule(task)
        build_plan(cfg, task, data)  # one training step, on a copy
    except ConfigError:
        lock.release()
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return lock


MAX_SUPERNODES = 256  # each a process or two on this host: fedbat train simulates more


def check_args(ns: argparse.Namespace) -> str | None:
    if not 1 <= ns.supernodes <= MAX_SUPERNODES:
        return (
            f"--supernodes={ns.supernodes}: must be in [1, {MAX_SUPERNODES}] (each SuperNode "
            "is a process here; fedbat train simulates any number of clients)"
        )
    if not (math.isfinite(ns.round_timeout) and 0 < ns.round_timeout <= 86400):
        return f"--round-timeout={ns.round_timeout:g}: must be a number of seconds in (0, 86400]"
    if ns.node_data is not None and "'" in str(ns.node_data.resolve()):
        return f"--node-data={ns.node_data}: a path with a quote (') cannot be deployed"
    where = ns.credentials
    if where is not None and where.exists():
        if not where.is_dir():
            return f"--credentials={where}: not a folder"
        if any(where.iterdir()) and (missing := Credentials(where).missing(ns.supernodes)):
            return (
                f"--credentials={where}: lacks {', '.join(missing)} (a folder as fedbat "
                "writes it, or an empty one to write a new set in)"
            )
    return None


def credentials(given: Path | None, supernodes: int, work: Path) -> Credentials:
    """The user's set when ``given`` holds one; else a new one, in ``given`` or ``work``."""
    if given is not None and given.is_dir() and any(given.iterdir()):
        return Credentials(given.resolve())
    return generate((given or work / "credentials").resolve(), supernodes)


def main(argv: list[str]) -> int:
    from fedbat.compose import prevalidate
    from fedbat.errors import ConfigError, fail

    ns, overrides = parse(argv)
    if problem := check_args(ns):
        return fail(problem)
    if shutil.which("flower-superlink") is None:
        return fail('flower: Flower is not installed; pip install "fedbat[flower]"')
    given = any(o.startswith("fed.clients_per_round=") for o in overrides)
    fits = [] if given else ["fed.clients_per_round=1"]  # set below: at most every node
    problem = prevalidate([*overrides, f"data.num_clients={ns.supernodes}", *fits])
    if problem:
        return fail(problem)
    try:
        cfg = job_config(overrides, ns.supernodes)
        if prepare.wanted(ns):  # for a deployment across machines: write, start nothing
            for line in prepare.write(ns, cfg):
                print(f"fedbat: wrote {line}")
            return 0
        lock = preflight(cfg, ns.node_data)
    except ConfigError as err:
        return fail(str(err))
    try:  # the run dir stays held until every process of the deployment has stopped
        work = Path(tempfile.mkdtemp(prefix="fedbat-flower-"))
        creds = credentials(ns.credentials, ns.supernodes, work)
        states, resumes = node_states(cfg)
        warm = not ns.cold_clients
        deployment = Deployment(ns.supernodes, work, creds, states, ns.node_data, warm)
        return deploy(cfg, deployment, ns.round_timeout, persist=resumes)
    finally:
        lock.release()


def deploy(cfg: DictConfig, deployment: Deployment, timeout: float, persist: bool = False) -> int:
    """Start the deployment, stream the run, stop everything; the exit code. Its work
    folder (logs, throw-away credentials) is removed when the run succeeds; ``persist``: the
    nodes hold their state from the run this one resumes."""
    from fedbat.train import done_line

    work = deployment.work
    started = time.time()

    def on_sigterm(signum: int, frame: object) -> None:
        raise Stop

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    code = 1
    try:
        deployment.start()
        own = deployment.data is not None
        run = deployment.submit(write_app(cfg, work, timeout, persist=persist, node_data=own))
        watch = Watch(deployment, run, work / ERROR_FILE)
        watch.start()
        assert run.stdout is not None
        with open(work / "run.log", "w") as log:  # the run's whole stream, for a failure
            for line in run.stdout:
                log.write(line)
                if line.startswith(("fedbat:", "round ", "resuming")) and not line.startswith(
                    "fedbat: error:"
                ):
                    print(line, end="", flush=True)
        run.wait()
        watch.done.set()
        watch.join()
        summary_path = Path(cfg.run_dir) / SUMMARY
        if (work / ERROR_FILE).is_file():  # the ServerApp stopped, and said why
            print((work / ERROR_FILE).read_text().strip(), file=sys.stderr)
            return 2
        if summary_path.is_file() and summary_path.stat().st_mtime >= started:
            print(done_line(json.loads(summary_path.read_text()), cfg.run_dir))
            code = 0
        else:
            watch.check_link(grace=2.0)
            why = watch.problem or tail(work / "run.log", 3)
            print(f"fedbat: error: the Flower run did not finish ({why}); logs in {work}",
                  file=sys.stderr)  # fmt: skip
            return 1
    except (Stop, KeyboardInterrupt) as stop:
        name = "SIGTERM" if isinstance(stop, Stop) else "SIGINT"
        ckpt = Path(cfg.run_dir) / CHECKPOINT
        kept = "its checkpoint is intact: rerun to resume" if ckpt.is_file() else "no checkpoint"
        print(f"fedbat: interrupted ({name}); deployment stopped; {kept}", file=sys.stderr)
        code = 143 if name == "SIGTERM" else 130
    except RuntimeError as err:
        print(f"fedbat: error: flower: {err}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        deployment.stop()
        if code == 0:
            shutil.rmtree(work, ignore_errors=True)
    return code
