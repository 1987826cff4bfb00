"""The non-image example: a byte-level transformer on the standard library's source files,
one client per file (``examples/stdlib_text.py``)."""

import csv
import importlib.util
from pathlib import Path

import pytest

import fedbat.compressors as C
from fedbat.compressors.plan import module_types

EXAMPLE = Path(__file__).parent.parent / "examples" / "stdlib_text.py"
spec = importlib.util.spec_from_file_location("stdlib_text", EXAMPLE)
stdlib_text = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stdlib_text)


def test_fedbat_compresses_embeddings_and_attention():
    plan = C.wire_plan(stdlib_text.ByteTransformer(), 100, module_types(["Linear", "Embedding"]))
    compressed = {s.name for s in plan if s.compressed}
    net = {"tok.weight", "pos.weight", "blocks.0.qkv.weight", "blocks.0.proj.weight"}
    assert {f"net.{n}" for n in net} <= compressed
    raw = {"head.bias", "norm.weight", "blocks.0.norm1.weight"}
    assert {f"net.{n}" for n in raw}.isdisjoint(compressed)


@pytest.mark.slow
@pytest.mark.parametrize("compressor", ["fedbat"])  # the others: the digits tests
def test_every_client_is_a_source_file_and_perplexity_falls(tmp_path, compressor):
    overrides = [f"compressor={compressor}", "fed.rounds=3", f"run_dir={tmp_path}"]
    summary = stdlib_text.main(overrides, files=12)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    ppl = [float(r["test/ppl"]) for r in rows]
    assert ppl[-1] < ppl[0] < 256 and summary["best_acc"] == min(ppl), ppl
    assert "num_clients: 12" in (tmp_path / "config.yaml").read_text()  # one per file
    if compressor == "fedbat":  # 1 bit per embedding / attention weight, plus the raw rest
        assert float(rows[0]["compression/uplink_ratio"]) > 15
