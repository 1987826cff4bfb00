"""Read an offline W&B run file (``run-<id>.wandb``) back into wandb's own protobuf records.

wandb 0.31 ships no Python reader for its run files (the Go core writes and syncs them),
but its record schema is in the package (``wandb.proto.wandb_internal_pb2``). The file is a
LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks
of chunks, each ``crc32 (4) | length (2) | type (1) | data``; type 1 is a whole record,
2/3/4 the first, middle and last parts of one that spans blocks.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

BLOCK, CHUNK_HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[pb.Record]:
    data = path.read_bytes()
    assert data[:7] == b":W&B" + (0xBEE1).to_bytes(2, "little") + b"\x00", data[:7]
    pos, parts = 7, b""
    while pos + CHUNK_HEADER <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER:  # a block's tail too short for a header
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, "bad crc"
        if kind == FULL:
            yield _parse(chunk)
        elif kind == FIRST:
            parts = chunk
        elif kind == MIDDLE:
            parts += chunk
        elif kind == LAST:
            yield _parse(parts + chunk)


def _parse(blob: bytes) -> pb.Record:
    record = pb.Record()
    record.ParseFromString(blob)
    return record


def _items(items: Any) -> dict[str, Any]:
    return {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in items}


def read_run(path: Path) -> dict[str, Any]:
    """``{"history": [{key: value, ...} per step], "summary": {...}, "config": {...},
    "artifacts": [(name, type, [file paths])], "axes": {metric: its x-axis}}`` of an
    offline run file."""
    out: dict[str, Any] = {"history": [], "summary": {}, "config": {}, "artifacts": [], "axes": {}}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            out["history"].append(_items(r.history.item))
        elif kind == "summary":
            out["summary"] |= _items(r.summary.update)
        elif kind == "config":
            out["config"] |= _items(r.config.update)
        elif kind == "run":
            out["config"] |= _items(r.run.config.update)
        elif kind == "metric" and r.metric.step_metric:
            out["axes"][r.metric.name] = r.metric.step_metric
        elif kind == "artifact":
            files = [e.path for e in r.artifact.manifest.contents]
            out["artifacts"].append((r.artifact.name, r.artifact.type, files))
    return out
