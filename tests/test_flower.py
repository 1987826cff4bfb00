"""A Flower client on a device: fedbat's compressors without the app's dependencies. The
deployment itself is tested in test_flower_deployment.py."""

import contextlib
import os
import socket
import ssl
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from omegaconf import OmegaConf

from fedbat.checkpoint import CHECKPOINT
from fedbat.cli import main
from fedbat.clientstate import ClientState
from fedbat.integrations.flower import warm
from fedbat.integrations.flower.node_state import NODES, DiskState, node_states
from fedbat.integrations.flower.protocol import pack_state
from fedbat.integrations.flower.security import generate
from fedbat.rundir import RunDirLock

DEVICE_CLIENT = textwrap.dedent(
    """
    import importlib.abc, sys

    class Refuse(importlib.abc.MetaPathFinder):  # a device without the app's packages
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)")

    sys.meta_path.insert(0, Refuse())
    import torch
    from torch import nn
    import fedbat.compressors as C
    from fedbat.compressors.packet import pack

    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4))
    plan = C.wire_plan(model, min_numel=100)
    comp = C.build("fedbat")
    hook = comp.training_hook(model, [s.name for s in plan if s.compressed], total_steps=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        loss = model(torch.randn(8, 20)).square().mean()
        opt.zero_grad(); loss.backward(); opt.step(); hook.after_step(step)
    update = {{k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
    fields = hook.encode_latent(hook.latent())
    fields = C.encode_fields(update, plan, comp, torch.Generator(), preencoded=fields)
    packet = pack(fields, comp)
    decoded, _ = C.decode_update(packet.data, plan, comp)
    print(sorted(decoded), packet.bits, sorted(m for m in {BLOCKED} if m in sys.modules))
    """
)


def test_compressors_import_without_lightning_hydra_wandb_matplotlib():
    blocked = {"lightning", "hydra", "omegaconf", "wandb", "matplotlib", "torchmetrics", "flwr"}
    code = DEVICE_CLIENT.format(BLOCKED=sorted(blocked))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("[]"), out.stdout
    assert "['0.bias', '0.weight', '2.bias', '2.weight']" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--supernodes", "0"], "--supernodes=0: must be in [1, 256] (each SuperNode"),
        (["--supernodes", "10000"], "--supernodes=10000: must be in [1, 256]"),
        (["--round-timeout", "nan"], "--round-timeout=nan: must be a number of seconds in"),
        (["--round-timeout", "inf"], "--round-timeout=inf: must be a number of seconds in"),
        (["--round-timeout", "0"], "--round-timeout=0: must be a number of seconds in"),
        (
            ["data.partition=label_count", "data.classes_per_client=11"],
            "data.classes_per_client=11: must be in [1, 10] (the dataset's number of classes)",
        ),
        (["+fed.roundz=1"], "fed.roundz=1: no such key"),
        (["data.num_clients=5"], "data.num_clients=5: a deployment has one client per SuperNode"),
        (["compressor=nope"], "compressor=nope: unknown compressor option"),
        (["fed.clients_per_round=4"], "fed.clients_per_round=4: must be in [1, 3]"),
        (['run_dir="it\'s"'], "a path with a quote (') cannot be deployed"),
    ],
)
def test_bad_deployment_input_is_one_line_and_starts_nothing(tmp_path, capsys, args, message):
    run_dir = tmp_path / "run"
    with contextlib.chdir(tmp_path):  # a relative run_dir= in args lands here
        assert main(["flower", f"run_dir={run_dir}", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not run_dir.exists() and not (tmp_path / "it's").exists()
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"run_dir={run_dir}" not in ps and "flower-superlink" not in ps


def test_a_held_run_dir_is_refused_before_any_process_starts(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text("kept\n")
    with RunDirLock(run_dir):
        assert main(["flower", f"run_dir={run_dir}"]) == 2
    assert ": in use by process" in capsys.readouterr().err
    assert (run_dir / "metrics.csv").read_text() == "kept\n"


def test_bad_credentials_folders_are_one_line_and_start_nothing(tmp_path, capsys):
    a_file = tmp_path / "creds.txt"
    a_file.write_text("not a folder")
    partial = tmp_path / "partial"
    generate(partial, 2)
    (partial / "supernode-1.key").unlink()
    cases = [
        (a_file, f"--credentials={a_file}: not a folder"),
        (partial, f"--credentials={partial}: lacks supernode-1.key, supernode-2.key,"),
    ]
    for where, message in cases:
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        assert main(["flower", "--credentials", str(where), f"run_dir={tmp_path}/run"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def _handshake(creds, ca) -> str:
    """A TLS handshake over a real socket on 127.0.0.1, by the standard library's ssl (not
    Flower's): the server presents ``creds``'s certificate, the client trusts ``ca``."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(creds.cert, creds.key)
    client_ctx = ssl.create_default_context(cafile=str(ca))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        with contextlib.suppress(ssl.SSLError, OSError), server_ctx.wrap_socket(conn, True) as s:
            s.sendall(b"ok")

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        raw = socket.create_connection(("127.0.0.1", port))
        with raw, client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.recv(2).decode()
    except ssl.SSLCertVerificationError as err:
        return err.verify_message
    finally:
        thread.join(10)
        listener.close()


def test_generated_credentials_verify_by_tls_and_keep_private_keys_private(tmp_path):
    creds = generate(tmp_path / "a", 2)
    other = generate(tmp_path / "b", 1)
    assert _handshake(creds, creds.ca) == "ok"
    assert "certificate signature failure" in _handshake(creds, other.ca)
    for i in range(2):  # each SuperNode key pair as Flower reads it: OpenSSH, EC P-384
        key = serialization.load_ssh_private_key(creds.node_key(i).read_bytes(), None)
        pub = serialization.load_ssh_public_key(creds.node_pub(i).read_bytes())
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert key.public_key().public_numbers() == pub.public_numbers()
    private = [creds.key, creds.node_key(0), creds.node_key(1)]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in private)
    assert creds.missing(2) == [] and creds.missing(3) == ["supernode-2.key", "supernode-2.pub"]
    before = {p: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    with pytest.raises(FileExistsError, match=r"ca\.pem"):  # a second set overwrites nothing
        generate(tmp_path / "a", 1)
    assert {p: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before


def test_a_node_keeps_two_blobs_on_disk_and_uses_the_newest_before_the_round(tmp_path):
    """A node's state on its disk: each round's blob written whole (a temporary file a kill
    left behind is never read), the newest two kept, and a round uses the newest blob of a
    round before it, so a blob that a killed round wrote is passed over when that round is
    played again after a resume."""
    disk = DiskState(tmp_path, client=7)
    assert disk.load(before=5) == (b"", -1)  # a node that never trained starts bare
    r0, r2, r3, r4 = (
        pack_state({"w": torch.full((2,), float(r))}, ClientState()) for r in (0, 2, 3, 4)
    )
    for r, blob in [(0, r0), (2, r2), (3, r3)]:
        disk.save(blob, r)
    assert sorted(p.name for p in (tmp_path / "client-7").iterdir()) == [
        "2.safetensors",
        "3.safetensors",
    ]
    assert disk.load(before=9) == (r3, 3)
    assert disk.load(before=3) == (r2, 2)  # round 3 played again: its own blob is not used
    assert disk.load(before=2) == (b"", -1)
    (tmp_path / "client-7" / "4.tmp").write_bytes(b"half")  # killed while writing round 4
    assert disk.load(before=9) == (r3, 3)
    disk.save(r4, 4)
    assert disk.load(before=9) == (r4, 4)
    assert not (tmp_path / "client-7" / "4.tmp").exists()
    (tmp_path / "client-7" / "4.safetensors").write_bytes(b"\x00" * 40)  # a damaged disk
    assert disk.load(before=9) == (r3, 3)  # the damaged blob is dropped, the one before used
    assert not (tmp_path / "client-7" / "4.safetensors").exists()


@pytest.mark.parametrize(
    ("resume", "has_checkpoint", "kept"),
    [("auto", True, True), ("auto", False, False), (False, True, False), ("own", True, True),
     ("other", True, False)],
)  # fmt: skip
def test_node_states_continue_only_a_resume_of_this_run_dir(tmp_path, resume, has_checkpoint, kept):
    """The SuperNodes' states survive only into a run that resumes this run dir's own
    checkpoint; a fresh start (or one from another run's checkpoint) empties their folder,
    and the ServerApp is told whether clients still hold what the checkpoint says."""
    run_dir = tmp_path / "run"
    (run_dir / NODES / "node-0").mkdir(parents=True)
    if has_checkpoint:
        (run_dir / CHECKPOINT).write_bytes(b"")
    other = tmp_path / "other.pt"
    given = {"own": str(run_dir / CHECKPOINT), "other": str(other)}.get(resume, resume)
    cfg = OmegaConf.create({"run_dir": str(run_dir), "resume": given})
    root, resumes = node_states(cfg)
    assert root == run_dir / NODES and resumes == kept
    assert (root / "node-0").is_dir() == kept


def test_a_warm_server_forks_flowers_apps_and_refuses_what_is_not_a_request(tmp_path):
    """A stand-in asks the warm server, which forks ``flwr-clientapp`` (or
    ``flwr-serverapp``) on the stand-in's streams and hands back its exit code; a malformed
    request, or one for another program, is refused alone; without a server the stand-in
    runs Flower's own command; a socket folder others may use is refused before anything is
    served."""
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    server = [sys.executable, "-m", "fedbat.integrations.flower.warm"]
    out = subprocess.run([*server, str(loose / "s"), str(tmp_path / "bin")], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and "others may use it (mode 755)" in out.stderr
    sock = tmp_path / "private" / "socket"
    proc = subprocess.Popen([*server, str(sock), str(tmp_path / "bin")], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert oct(sock.parent.stat().st_mode & 0o777) == "0o700"
        stand_in = str(tmp_path / "bin" / "flwr-clientapp")
        env = os.environ | {warm.SOCKET: str(sock)}
        ok = subprocess.run([stand_in, "--help"], env=env, capture_output=True, text=True)
        assert ok.returncode == 0 and "usage: flwr-clientapp" in ok.stdout
        bad = subprocess.run([stand_in, "--bogus"], env=env, capture_output=True, text=True)
        assert bad.returncode == 2 and "--token" in bad.stderr
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:  # no streams sent
            s.connect(str(sock))
            s.send(b'{"argv": ["flwr-clientapp"], "env": {}, "cwd": "/"}')
            assert s.recv(16) == b""  # refused: closed without an exit code
        for ask in (b'{"argv": ["sh", "-c", "id"], "env": {}, "cwd": "/"}', b'{"argv": [[1]]}',
                    b"not json"):  # another program, no program, no request  # fmt: skip
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.connect(str(sock))
                socket.send_fds(s, [ask], [0, 1, 2])
                assert s.recv(16) == b""
        server_app = str(tmp_path / "bin" / "flwr-serverapp")
        ok = subprocess.run([server_app, "--help"], env=env, capture_output=True, text=True)
        assert ok.returncode == 0 and "usage: flwr-serverapp" in ok.stdout
        again = subprocess.run([stand_in, "--help"], env=env, capture_output=True, text=True)
        assert again.returncode == 0  # the server goes on
        cold = subprocess.run([stand_in, "--help"], env=env | {warm.SOCKET: str(tmp_path / "x")},
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert cold.returncode == 0 and "usage: flwr-clientapp" in cold.stdout
    finally:
        proc.kill()
        log, _ = proc.communicate()
    assert log.count("forked flwr-clientapp") == 3 and log.count("refused a request") == 4
    assert log.count("forked flwr-serverapp") == 1 and "not one of" in log


def test_message_bytes_is_flowers_serialisation_of_every_object(monkeypatch):
    """A message's wire bytes, each object's id computed once, equal the lengths of Flower's
    own serialisation of every object of its tree, counted the slow way (every id
    recomputed), and hold the payload."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.task_identity import TaskIdentity

    from fedbat.integrations.flower.server_app import message_bytes

    monkeypatch.setattr(TaskIdentity, "_run_id", 7)  # as in a ServerApp
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 3)
    records = {"a": ConfigRecord({"packet": os.urandom(1 << 20), "round": 3, "nonce": "ab"}),
               "b": ConfigRecord({"x": 1.5})}  # fmt: skip
    message = Message(RecordDict(records), dst_node_id=2, message_type=MessageType.TRAIN)
    slow = sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
    assert message_bytes(message) == message_bytes(message) == slow
    assert 1 << 20 < slow < (1 << 20) + 4096
