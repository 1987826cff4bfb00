"""Peak memory and seconds of encoding, validating and decoding a 100M-parameter update
through every compressor, each in a fresh process (so its peak RSS is its own).

The model is random (12 blocks of two 1,536 x 2,720 Linear layers plus biases and
LayerNorms: 100.3M fp32 parameters, 401 MB); the update is a random tensor per parameter.
For each compressor the script prints the packet size, encode and decode seconds, and the
peak RSS above the process's RSS once the model and its update exist, in units of the
model's fp32 size (the packet itself, for ``none``, is 1.0 of them; the decoded update
another 1.0), twice: with glibc's default allocator settings, which keep freed per-tensor
temporaries mapped, and with ``MALLOC_MMAP_THRESHOLD_=1048576``, which returns them, so
that the second column is what the code holds at once.
Run: python benchmarks/big_model.py [--compressors none,fedbat,...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import _isolate  # noqa: F401
import torch
from torch import nn

import fedbat.compressors as C

DIM, HIDDEN, BLOCKS = 1536, 2720, 12


def model() -> nn.Module:
    block = lambda: nn.Sequential(  # noqa: E731
        nn.LayerNorm(DIM), nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, DIM)
    )
    with torch.device("meta"):  # shapes only: the update below is the data
        return nn.Sequential(*(block() for _ in range(BLOCKS)))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(name: str) -> dict[str, float]:
    """One compressor, in this process: the plan and update first, then encode and decode."""
    torch.set_num_threads(1)
    plan = C.wire_plan(model())
    g = torch.Generator().manual_seed(0)
    update = {s.name: torch.randn(s.shape, generator=g) for s in plan}
    model_bytes = sum(s.numel * 4 for s in plan)
    base = current_rss_bytes()
    comp = C.build(name)
    t0 = time.perf_counter()
    packet = C.encode_update(update, plan, comp, torch.Generator().manual_seed(1))
    t1 = time.perf_counter()
    decoded, _ = C.decode_update(packet.data, plan, comp)
    t2 = time.perf_counter()
    assert decoded.keys() == update.keys()
    return {
        "params": sum(s.numel for s in plan),
        "packet_mb": len(packet.data) / 1e6,
        "encode_s": t1 - t0,
        "decode_s": t2 - t1,
        "peak_over_model": (peak_rss_bytes() - base) / model_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compressors", default=",".join(C.available()))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    print(f"torch {torch.__version__}, 1 thread, each compressor in a fresh process")
    print(f"{'compressor':<12}{'params':>12}{'packet MB':>11}{'encode s':>10}{'decode s':>10}"
          f"{'peak/model':>12}{'(1 MiB mmap)':>14}")  # fmt: skip
    for name in args.compressors.split(","):
        r, held = (child(name, env) for env in ({}, {"MALLOC_MMAP_THRESHOLD_": "1048576"}))
        print(f"{name:<12}{r['params']:>12,}{r['packet_mb']:>11.1f}{r['encode_s']:>10.2f}"
              f"{r['decode_s']:>10.2f}{r['peak_over_model']:>12.2f}"
              f"{held['peak_over_model']:>14.2f}")  # fmt: skip


def child(name: str, env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--one", name],
        capture_output=True, text=True, check=True, env={**os.environ, **env},
    )  # fmt: skip
    return json.loads(out.stdout.splitlines()[-1])


if __name__ == "__main__":
    main()
