"""A real local Flower deployment: a SuperLink and SuperNodes as separate processes on
127.0.0.1, started by ``fedbat flower``.

They run with FEDBAT_FLOWER_TESTS=1 (``.ci/run`` runs this file so, after the suite);
otherwise they skip with the reason, so that the suite stays fast: each starts a SuperLink,
SuperNodes and Flower's own processes, about a minute per deployment on 2 cores. They are
mostly waiting, so ``.ci/run`` runs two at a time (``-n 2``): each test sees, signals and
counts only the processes it started (``TAG``).
"""

import csv
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fedbat.integrations.flower import watchdog
from fedbat.integrations.flower.deploy import deploy as deploy_job
from fedbat.integrations.flower.deploy import job_config, preflight
from fedbat.integrations.flower.processes import Deployment, PortTaken, wait_serving
from fedbat.integrations.flower.security import generate
from fedbat.lifecycle import run
from fedbat.rundir import RunDirLock
from tests.conftest import make_cfg
from tests.test_readme import across, blocks, run_block

pytestmark = pytest.mark.skipif(
    not os.environ.get("FEDBAT_FLOWER_TESTS"),
    reason="real Flower deployments take minutes: FEDBAT_FLOWER_TESTS=1 python -m pytest "
    "tests/test_flower_deployment.py -n 2 (.ci/run does)",
)

JOB = ["fed.rounds=3", "fed.clients_per_round=2", "trainer.threads=1", "model.hidden=1024"]
TAG = "FEDBAT_TEST_DEPLOYMENT"


@pytest.fixture(autouse=True)
def _tagged(monkeypatch):
    """Every process the test starts inherits its own tag, as the deployment's processes
    inherit the guard's mark: tests running side by side never touch each other's."""
    monkeypatch.setenv(TAG, secrets.token_hex(8))


def own(*needles: str) -> list[int]:
    """This test's processes whose command line holds one of ``needles`` (a zombie left to
    an init that does not reap is not running)."""
    found = []
    for pid in watchdog.marked(os.environ[TAG], TAG):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # gone
        if state != "Z" and any(n in args for n in needles):
            found.append(pid)
    return found


def flower_processes() -> list[int]:
    """This test's Flower processes still running."""
    return own("flower-super", "flwr-")


def deploy(run_dir: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = ["fedbat", "flower", "--supernodes", "3", *JOB, f"run_dir={run_dir}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(("compressor", "own_data"), [("none", False), ("fedbat", True)])
def test_deployment_matches_fedbat_train(tmp_path, compressor, own_data):
    """Clients in their own processes, reached over Flower's wire, train exactly what
    ``fedbat train`` trains: the same history, bit for bit (same threads, same CPU). With 2 of
    3 clients a round, clients that sat a round out are sent the broadcast they missed.
    ``own_data``: each node reads only its own folder (``--write-node-data`` wrote client
    i's samples there) and the server only a folder of evaluation data, so what every
    client trained on came from its node's disk. (ef_signsgd's match is the resume test's.)"""
    args = [f"compressor={compressor}"]
    if own_data:
        d = tmp_path / "data"
        made = ["fedbat", "flower", "--supernodes", "3", "--write-node-data", str(d), *JOB]
        assert subprocess.run(made, capture_output=True, timeout=120).returncode == 0
        args += ["--node-data", str(d), "data=tensors", f"data.root={d / 'server'}"]
        assert not (d / "server" / "train.safetensors").exists()
    out = deploy(tmp_path / "flower", *args)
    assert out.returncode == 0, out.stdout[-1500:] + out.stderr[-3000:]
    assert "fedbat: done: test/acc final" in out.stdout
    run(make_cfg(tmp_path / "train", *JOB, "data.num_clients=3", f"compressor={compressor}"))
    flower, train = rows(tmp_path / "flower"), rows(tmp_path / "train")
    assert len(flower) == len(train) == 3
    rejected = [line for line in out.stdout.splitlines() if "rejected client" in line]
    for f, t in zip(flower, train, strict=True):
        for key in ("clients/accepted", "train/loss", "test/acc", "bits/uplink", "bits/downlink"):
            assert f[key] == t[key], (key, f["round"], rejected)
        wire, packets = 8 * float(f["flower/uplink_bytes"]), float(f["bits/uplink"])
        assert packets <= wire  # Flower's messages carry the packets and a little more
        if compressor == "fedbat":
            assert wire <= 1.05 * packets, (wire, packets)


def test_a_400_mb_packet_travels_both_ways(tmp_path):
    """A 100M-parameter MLP (401 MB in fp32) with compressor=none: its full model goes down
    and its whole update comes back through Flower's messages (gRPC's limit is 2 GB)."""
    cmd = ["fedbat", "flower", "--supernodes", "1", "fed.rounds=1", "model.hidden=1400000",
           "data=synthetic", "data.train_size=256", "data.test_size=64",  # one local step
           "fed.local_epochs=1", "fed.batch_size=256", "trainer.threads=2",
           f"run_dir={tmp_path}"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-1500:] + out.stderr[-3000:]
    (r,) = rows(tmp_path)
    model_bytes = (64 * 1_400_000 + 1_400_000 + 1_400_000 * 10 + 10) * 4  # by hand: 420 MB
    assert r["clients/accepted"] == "1"
    for way in ("uplink", "downlink"):
        assert model_bytes <= float(r[f"flower/{way}_bytes"]) <= 1.001 * model_bytes + 4096


def wait_rounds(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.csv").is_file() and len(rows(run_dir)) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.3)
    raise AssertionError(f"no round {n} within {timeout} s")


def test_a_killed_client_is_rejected_alone_and_sigterm_stops_cleanly(tmp_path):
    """Kill one SuperNode (and its ClientApp) mid-run, with the default round timeout of
    600 s: the round stops waiting for it once Flower reports its node offline (Flower's
    heartbeats: about a minute), completes with the other clients and counts the rejection;
    later rounds do not wait for it at all. Then SIGTERM stops the deployment: the
    checkpoint of the last round is kept, no Flower process is left, and the same command
    resumes."""
    run_dir = tmp_path / "run"
    cmd = ["fedbat", "flower", "--supernodes", "3", *JOB]
    cmd += ["fed.clients_per_round=3", "fed.rounds=4", f"run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_rounds(run_dir, 1, proc)
    killed = time.monotonic()
    for pid in own("partition-id=1 "):
        os.killpg(pid, signal.SIGKILL)
    wait_rounds(run_dir, 3, proc, timeout=300)
    assert time.monotonic() - killed < 240  # not 600 s a round
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "interrupted (SIGTERM); deployment stopped; its checkpoint is intact" in stderr
    assert "rejected client 1: its SuperNode went offline" in stdout
    history = rows(run_dir)
    assert history[1]["clients/rejected"] == "1" and history[1]["clients/accepted"] == "2"
    assert all(float(r["test/acc"]) > 0.5 for r in history)
    assert not flower_processes()
    done = len(history)
    out = deploy(run_dir, "fed.clients_per_round=3", "fed.rounds=4")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"after round {done} of 4" in out.stdout
    assert len(rows(run_dir)) == 4 and rows(run_dir)[-1]["clients/rejected"] == "0"


def test_a_deployment_killed_mid_run_resumes_bitwise_from_the_nodes_disks(tmp_path):
    """SIGKILL of the whole deployment (``kill -9`` of the launcher) once round 2 of 4 is
    checkpointed, as round 3's clients train and write their state: its guard stops every
    process of the deployment (SuperExec's ServerApp and ClientApps too) and the run dir is
    free again. The same command resumes, each node reading the state it kept on its disk
    (the weights it holds, its error-feedback residuals; a blob the killed round wrote is
    passed over), and the whole history equals an uninterrupted ``fedbat train`` bit for
    bit."""
    run_dir = tmp_path / "flower"
    job = ["fed.rounds=4", "compressor=ef_signsgd"]
    cmd = ["fedbat", "flower", "--supernodes", "3", *JOB, *job, f"run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_rounds(run_dir, 2, proc)
    deadline = time.monotonic() + 30  # a client of round 3 (index 2) has written its state
    while not list(run_dir.glob("nodes/*/client-*/2.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20
    while flower_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not flower_processes()
    assert RunDirLock(run_dir).holder() is None
    done = len(rows(run_dir))
    assert 2 <= done < 4
    out = deploy(run_dir, *job)
    assert out.returncode == 0, out.stdout[-1500:] + out.stderr[-3000:]
    assert f"after round {done} of 4" in out.stdout
    run(make_cfg(tmp_path / "train", *JOB, *job, "data.num_clients=3"))
    flower, train = rows(run_dir), rows(tmp_path / "train")
    assert len(flower) == len(train) == 4
    for f, t in zip(flower, train, strict=True):
        for key in ("clients/accepted", "train/loss", "test/acc", "bits/uplink", "bits/downlink"):
            assert f[key] == t[key], (key, f["round"])
    assert all(r["clients/rejected"] == "0" for r in flower)


def test_a_dead_superlink_ends_the_deployment_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    cmd = ["fedbat", "flower", "--supernodes", "2", *JOB, "fed.rounds=50", f"run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_rounds(run_dir, 1, proc)
    for pid in own("flower-superlink"):
        os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    last = err.strip().splitlines()[-1]
    # the launcher names the SuperLink's exit; when Flower's own `flwr run` notices first,
    # its line says the SuperLink is unreachable: either way, one line naming the SuperLink
    named = ("the SuperLink exited with -9", "Connection to the SuperLink is unavailable")
    assert last.startswith("fedbat: error: the Flower run did not finish ("), err
    assert any(n in last for n in named), err
    assert not flower_processes() and RunDirLock(run_dir).holder() is None


def test_a_serverapp_error_mid_run_is_the_launchers_one_line(tmp_path):
    """The run dir replaced by a file mid-run: the ServerApp's error reaches the launcher,
    which stops at once, exit 2."""
    run_dir = tmp_path / "run"
    cmd = ["fedbat", "flower", "--supernodes", "2", *JOB, "fed.rounds=50", f"run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_rounds(run_dir, 1, proc)
    shutil.rmtree(run_dir)
    run_dir.write_text("not a directory any more")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert (
        err.strip().splitlines()[-1].startswith(f"fedbat: error: run_dir={run_dir}: cannot write")
    ), err
    assert not flower_processes()


def test_a_port_taken_by_another_process_is_named(tmp_path):
    """A squatter binds the port first: the SuperLink's own bind fails and is reported as
    such (a retry picks another port), not as a connection failure."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        log = tmp_path / "superlink.log"
        with open(log, "w") as f:
            link = subprocess.Popen(
                ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port)],
                stdout=f, stderr=subprocess.STDOUT,
            )  # fmt: skip
        with pytest.raises(PortTaken, match=f"127.0.0.1:{port} is in use by another process"):
            wait_serving(port, link, "the SuperLink", log)
        link.wait(timeout=30)


def test_readme_flower_block_runs_as_written(tmp_path):
    (block,) = [
        b for b in blocks() if "fedbat flower --supernodes 3 compressor=fedbat fed.rounds=5" in b
    ]
    run_block(tmp_path, block)


def test_readme_across_machines_block_runs_as_written(tmp_path):
    """The commands of "Across machines", as written, in one folder: the SuperLink, the warm
    ClientApp server and the SuperNodes in the background (each waits for what it needs as it
    would on its machine), the rest in order. Every node reads only its own folder and the
    server only the evaluation folder; every ClientApp is a fork of the warm server; and the
    history equals ``fedbat train``'s bit for bit."""
    token = secrets.token_hex(8)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "FEDBAT_"))}
    env |= {"HOME": str(tmp_path), watchdog.MARK: token}  # every process marked for cleanup
    started = []
    try:
        for command in across():
            if any(s in command for s in ("flower-super", "flower.warm")):  # they serve
                log = open(tmp_path / f"{len(started)}.log", "w")  # noqa: SIM115
                started.append(subprocess.Popen(["bash", "-c", command], cwd=tmp_path, env=env,
                                                 stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
                if command.startswith("flower-superlink"):
                    wait_serving(9092, started[-1], "the SuperLink", tmp_path / "0.log")
                while "flower.warm" in command and not (tmp_path / "warm" / "socket").exists():
                    assert started[-1].poll() is None, log.name
                    time.sleep(0.1)
                continue
            out = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=400)  # fmt: skip
            assert out.returncode == 0, (command, out.stdout[-2000:], out.stderr[-2000:])
    finally:
        watchdog.kill_marked(token)
        for proc in started:
            proc.wait(timeout=30)
    assert not (tmp_path / "fl-data" / "server" / "train.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["client-0", "client-1"]
    forks = (tmp_path / "1.log").read_text().count("fedbat: warm: forked flwr-clientapp")
    assert forks >= 2 * 3, forks  # each client's 3 rounds, and the queries
    (summary,) = (tmp_path / "runs" / "flower").rglob("summary.json")
    job = ["data.num_clients=2", "fed.clients_per_round=2", "compressor=fedbat", "fed.rounds=3"]
    run(make_cfg(tmp_path / "train", *job))
    flower, train = rows(summary.parent), rows(tmp_path / "train")
    assert len(flower) == len(train) == 3
    for f, t in zip(flower, train, strict=True):
        for key in ("clients/accepted", "train/loss", "test/acc", "bits/uplink", "bits/downlink"):
            assert f[key] == t[key], (key, f["round"])


class WithIntruders(Deployment):
    """The real deployment, and two SuperNodes that must not join it: one signs with a key
    the SuperLink never registered, one does not trust the deployment's CA. Its logs are
    kept for the test (the launcher removes them after a successful run)."""

    def start(self, tries: int = 3) -> None:
        super().start(tries)
        other = generate(self.work / "other", 1)
        self.secrets = key_material(other.root) + key_material(self.creds.root)
        self.start_supernode("unregistered", 0, self.creds.ca, other.node_key(0))
        self.start_supernode("untrusting", 1, other.ca, self.creds.node_key(1))

    def stop(self) -> None:
        self.exited = {n: self.procs[n].poll() for n in ("unregistered", "untrusting")}
        super().stop()
        keys = shutil.ignore_patterns("*.key")
        shutil.copytree(self.work, self.work.parent / "kept", ignore=keys)


def key_material(folder: Path) -> list[str]:
    """The base64 lines of every private key in ``folder``."""
    keys = [k.read_text() for k in folder.glob("*.key")]
    return [line for k in keys for line in k.splitlines() if "PRIVATE KEY" not in line]


def test_intruding_supernodes_are_refused_and_no_secret_reaches_a_log(tmp_path):
    """TLS and SuperNode authentication (fedbat flower's default): the unregistered and the
    untrusting SuperNode are refused and exit (Flower's code 305: not activated; a
    certificate that does not verify) and the run trains with the two real ones; no private key's
    material is in any log, the run's stream or the run dir."""
    cfg = job_config([*JOB, "fed.rounds=2", f"run_dir={tmp_path / 'run'}"], 2)
    lock = preflight(cfg)
    work = tmp_path / "work"
    work.mkdir()
    deployment = WithIntruders(2, work, generate(work / "credentials", 2))
    try:
        assert deploy_job(cfg, deployment, 240) == 0
    finally:
        lock.release()
    history = rows(tmp_path / "run")
    assert [r["clients/accepted"] for r in history] == ["2", "2"]
    assert deployment.exited == {"unregistered": 1, "untrusting": 1}  # before the teardown
    kept = tmp_path / "kept"
    unregistered, untrusting = ((kept / f"{n}.log").read_text() for n in deployment.exited)
    assert "Exit Code: 305" in unregistered and "Failed to activate SuperNode" in unregistered
    assert "Exit Code: 305" in untrusting and "CERTIFICATE_VERIFY_FAILED" in untrusting
    secrets = [s for s in deployment.secrets if len(s) > 20]
    assert len(secrets) > 10
    logs = [p for p in [*kept.rglob("*"), *(tmp_path / "run").rglob("*")] if p.is_file()]
    leaked = [p for p in logs if any(s in p.read_text(errors="replace") for s in secrets)]
    assert not leaked


class WithHostileNode(Deployment):
    """The real deployment submitting tests/hostile_client_app.py as its ClientApp."""

    def submit(self, app: Path) -> subprocess.Popen:
        toml = app / "pyproject.toml"
        real = "fedbat.integrations.flower.client_app:app"
        toml.write_text(toml.read_text().replace(real, "tests.hostile_client_app:app"))
        return super().submit(app)


def test_a_hostile_node_is_rejected_alone_each_round_with_why(tmp_path, capsys, monkeypatch):
    """Partition 1's node replays its last reply, answers for an earlier round, for another
    client, with an oversized packet, with malformed logs and with 100x its samples, one
    attack a round: each reply is rejected alone, naming why, and the honest node's update
    makes every round."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent.parent))  # for the test's app
    cfg = job_config([*JOB, "fed.rounds=7", f"run_dir={tmp_path / 'run'}"], 2)
    lock = preflight(cfg)
    work = tmp_path / "work"
    work.mkdir()
    try:
        assert deploy_job(cfg, WithHostileNode(2, work, generate(work / "c", 2)), 400) == 0
    finally:
        lock.release()
    out = capsys.readouterr().out
    history = rows(tmp_path / "run")
    assert [r["clients/accepted"] for r in history] == ["2"] + ["1"] * 6
    assert [r["clients/rejected"] for r in history] == ["0"] + ["1"] * 6
    why = [
        "round 2: rejected client 1: reply to another request (round 0, nonce '",
        "round 3: rejected client 1: reply to another request (round 1, nonce '",
        "round 4: rejected client 1: reply for client 0, expected 1",
        "round 5: rejected client 1: a packet of ",
        "round 6: rejected client 1: malformed reply (JSONDecodeError",
        "round 7: rejected client 1: claims ",
    ]
    for line in why:
        assert line in out, (line, out[-3000:])
    assert "fit this model" in out and "samples; its partition has " in out
