"""Each Flower node's own data (``fedbat/integrations/flower/node_data.py``) and the
``tensors`` format it is kept in. The deployment that trains on it is in
test_flower_deployment.py."""

import subprocess

import pytest
import torch
from safetensors.torch import save_file

from fedbat.assembly import build_datamodule, build_plan, build_task
from fedbat.cli import main
from fedbat.client import probe_batch
from fedbat.datamodules.datasets import load
from fedbat.datamodules.datasets.tensors import write_split
from fedbat.errors import ConfigError
from fedbat.integrations.flower.node_data import declared, node_data, server_data, write_folders
from tests.conftest import make_cfg

JOB = ["data=digits", "data.num_clients=3"]


def test_a_split_round_trips_bitwise_with_its_facts(tmp_path):
    x, y = torch.randn(7, 3, 4, 4), torch.tensor([0, 1, 2, 3, 4, 0, 1])
    write_split(tmp_path, "train", x, y, num_classes=5, augment=True)
    s = load("tensors", root=str(tmp_path))
    assert torch.equal(s.x_train, x) and torch.equal(s.y_train, y)
    assert s.x_test.shape == (0, 3, 4, 4) and s.y_test.dtype == torch.int64
    assert (s.num_classes, s.input_shape, s.augment) == (5, (3, 4, 4), True)


def bad_split(path, **change):
    tensors = {"x": torch.randn(4, 1, 2, 2), "y": torch.tensor([0, 1, 2, 1])}
    meta = {"num_classes": "3"}
    for k, v in change.items():
        (meta if k == "num_classes" else tensors)[k] = v
    save_file({k: v for k, v in tensors.items() if v is not None}, str(path), metadata=meta)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": torch.randn(4, 1, 2, 2, dtype=torch.float64)}, "x: torch.float64 of shape"),
        ({"x": torch.randn(4, 4)}, "must be float32 of N x C x H x W"),
        ({"x": torch.full((4, 1, 2, 2), float("nan"))}, "x holds NaN or infinite values"),
        ({"y": torch.tensor([0, 1, 2])}, "must be int64 of (4,)"),
        ({"y": torch.tensor([0, 1, 2, 3])}, "labels must be in [0, 3)"),
        ({"y": torch.tensor([0, -1, 2, 1])}, "labels must be in [0, 3)"),
        ({"y": None}, "must hold tensors 'x' and 'y'"),
        ({"num_classes": "ten"}, "metadata num_classes='ten': must be an integer"),
    ],
)
def test_a_bad_split_is_one_line_naming_the_file_and_the_problem(tmp_path, change, message):
    bad_split(tmp_path / "train.safetensors", **change)
    with pytest.raises(ConfigError, match=r"train\.safetensors") as err:
        load("tensors", root=str(tmp_path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_folder_without_splits_or_with_a_damaged_one_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"holds neither train\.safetensors or test"):
        load("tensors", root=str(tmp_path))
    (tmp_path / "test.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{not json")
    with pytest.raises(ConfigError, match="is not a readable safetensors file"):
        load("tensors", root=str(tmp_path))
    write_split(tmp_path, "test", torch.randn(2, 1, 3, 3), torch.tensor([0, 1]), 2)
    write_split(tmp_path, "train", torch.randn(2, 1, 2, 2), torch.tensor([0, 1]), 2)
    with pytest.raises(ConfigError, match="differ in image shape or num_classes"):
        load("tensors", root=str(tmp_path))


def test_each_node_serves_exactly_the_batches_its_client_trains_on_in_fedbat_train(tmp_path):
    """The folders ``fedbat flower --write-node-data`` writes: node i's data, read from its
    folder alone, gives client i's batches of the whole dataset bit for bit, and the
    server's folder holds the evaluation data and no training sample."""
    cfg = make_cfg(tmp_path / "run", *JOB)
    write_folders(cfg, tmp_path / "d")
    whole = build_datamodule(cfg)
    for i in range(3):
        node = node_data({"partition-id": i, "data-root": str(tmp_path / "d" / f"node-{i}")}, cfg)
        assert node is not None and node.client_size(i) == whole.client_size(i)
        assert node.num_clients == 3 and node.test_batches(8, "cpu") is None
        g1, g2 = torch.Generator().manual_seed(i), torch.Generator().manual_seed(i)
        for (xa, ya), (xb, yb) in zip(
            node.client_batches(i, 16, g1, "cpu"),
            whole.client_batches(i, 16, g2, "cpu"),
            strict=True,
        ):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        with pytest.raises(ValueError, match=f"data is not on this node \\({i}\\)"):
            node.client_size((i + 1) % 3)
    server = load("tensors", root=str(tmp_path / "d" / "server"))
    assert len(server.y_train) == 0 and torch.equal(server.x_test, whole.data.x_test)


def test_the_server_and_its_nodes_agree_on_the_plan_without_its_seeing_a_training_sample(
    tmp_path,
):
    """The server tries its training step on an evaluation batch (it has no other), and
    finds the same wire plan as a node that tries it on its own."""
    cfg = make_cfg(tmp_path / "run", *JOB, "model=cnn", "model.width=4")
    write_folders(cfg, tmp_path / "d")
    server_cfg = make_cfg(tmp_path / "run", *JOB, "model=cnn", "model.width=4", "data=tensors",
                          f"data.root={tmp_path / 'd' / 'server'}")  # fmt: skip
    sizes = {}
    server = server_data(server_cfg, sizes)
    assert server.client_size(2) == 0 and next(server.client_batches(2, 8), None) is None
    sizes[2] = 41
    assert server.client_size(2) == 41
    node = node_data({"partition-id": 2, "data-root": str(tmp_path / "d" / "node-2")}, cfg)
    x, y = probe_batch(server, 8, "cpu")
    assert len(x) == 8 and torch.equal(y, server.data.y_test[:8])
    plans = [build_plan(cfg, build_task(c, d), d) for c, d in ((server_cfg, server), (cfg, node))]
    assert [(s.name, s.compressed) for s in plans[0]] == [(s.name, s.compressed) for s in plans[1]]
    assert any("running_mean" in s.name for s in plans[0])  # a step changed them: they travel


def test_a_node_may_name_its_own_lightning_datamodule(tmp_path):
    cfg = make_cfg(tmp_path / "run", *JOB)
    config = {"partition-id": "1", "datamodule": "tests.user_project.lit.DigitsDataModule",
              "datamodule-args": '{"batch_size": 16}'}  # fmt: skip
    node = node_data(config, cfg)
    assert node is not None and node.client_size(1) == 1437  # the module's whole train set
    batch = next(node.client_batches(1, 16, torch.Generator(), "cpu"))  # the module's dicts
    assert batch["image"].shape == (16, 1, 8, 8)
    for args in ("[1]", "{batch_size: 16}"):
        with pytest.raises(ConfigError, match="datamodule-args: must be a JSON object"):
            node_data(config | {"datamodule-args": args}, cfg)
    with pytest.raises(ConfigError, match="give data-root or datamodule, not both"):
        node_data(config | {"data-root": str(tmp_path)}, cfg)
    assert node_data({"partition-id": "1"}, cfg) is None  # the partition-id mode


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("fed.bn_stats=recompute", "fed.bn_stats=recompute: the server recomputes"),
        ("system.compute_s_per_sample=0.01", "system: the simulated clock needs every client"),
    ],
)
def test_what_needs_the_clients_data_on_the_server_is_refused(tmp_path, override, message):
    cfg = make_cfg(tmp_path / "run", *JOB, override)
    with pytest.raises(ConfigError, match=message.replace("'", ".")):
        server_data(cfg, {})


def test_only_a_count_a_dataset_could_have_is_declared():
    assert [declared(c) for c in (5, 1, 2**31 - 1)] == [5, 1, 2**31 - 1]
    assert [declared(c) for c in (0, -3, 2**31, True, "5", 5.0, None)] == [None] * 7


def test_node_data_flags_are_checked_before_any_process_starts(tmp_path, capsys):
    d = tmp_path / "d"
    assert main(["flower", "--supernodes", "2", "--write-node-data", str(d), *JOB[:1]]) == 0
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert sorted(p.parent.name for p in before) == ["node-0", "node-1", "server"]
    assert main(["flower", "--supernodes", "2", "--write-node-data", str(d)]) == 2
    assert "server exists; name a new folder" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before
    run_dir = tmp_path / "run"
    args = ["flower", "--supernodes", "3", "--node-data", str(d), f"run_dir={run_dir}",
            "data=tensors", f"data.root={d / 'server'}"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "node-2" in err[0], err
    assert not run_dir.exists()
    quoted = tmp_path / "it's"
    assert main(["flower", "--node-data", str(quoted), f"run_dir={run_dir}"]) == 2
    assert "--node-data=" in capsys.readouterr().err
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(run_dir) not in ps
