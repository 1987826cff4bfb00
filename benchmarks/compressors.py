"""Encode + decode throughput and wire overhead of every compressor, through real packets.

Inputs: one 10M-element fp32 tensor, and a full cnn4 (FMNIST) and resnet10 (CIFAR) update.
Prints MB/s of fp32 input for encode->bytes->decode, beside a plain tensor copy measured in
the same run, and the ratio to that copy; then the packet's bytes, its payload bytes (the
compressed tensors themselves), the container's share of the packet (header, names,
padding), the payload bits per compressed coordinate (raw tensors' bits left out) and the
vNMSE ||decoded - x||^2 / ||x||^2 over the compressed tensors (one draw).
Run: python benchmarks/compressors.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import _isolate  # noqa: F401
import torch

import fedbat.compressors as C
from fedbat.models import build


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def workloads() -> dict[str, tuple[list[C.TensorSpec], dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    out = {}
    big = torch.randn(10_000_000, generator=g)
    out["10M fp32"] = ([C.TensorSpec("x", big.shape, torch.float32, True)], {"x": big})
    for name, shape in (("cnn4", (1, 28, 28)), ("resnet10", (3, 32, 32))):
        model = build(name, shape, 10)
        update = {
            k: (torch.randn(v.shape, generator=g) * 0.01).to(v.dtype)
            for k, v in model.state_dict().items()
        }
        out[name] = (C.wire_plan(model), update)
    return out


def per_coordinate(
    plan: list[C.TensorSpec],
    update: dict[str, torch.Tensor],
    decoded: dict[str, torch.Tensor],
    payload_bits: int,
) -> tuple[float, float]:
    """Payload bits per compressed coordinate, and the vNMSE over the compressed tensors."""
    compressed = [s for s in plan if s.compressed]
    raw_bits = sum(8 * s.numel * s.dtype.itemsize for s in plan if not s.compressed)
    n = sum(s.numel for s in compressed)
    err = sum(float((decoded[s.name] - update[s.name]).double().square().sum()) for s in compressed)
    norm = sum(float(update[s.name].double().square().sum()) for s in compressed)
    return (payload_bits - raw_bits) / n, err / norm


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    print(
        f"{'input':10} {'compressor':11} {'MB/s':>9} {'x copy':>8} {'packet bytes':>13} "
        f"{'payload':>10} {'overhead':>9} {'bits/coord':>10} {'vNMSE':>8}"
    )
    for wname, (plan, update) in workloads().items():
        mb = sum(v.numel() * 4 for v in update.values()) / 1e6
        copy_s = best_seconds(lambda u=update: {k: v.clone() for k, v in u.items()}, args.repeats)
        print(f"{wname:10} {'(copy)':11} {mb / copy_s:9.1f} {1.0:8.3f}")
        for name in C.available():
            comp = C.build(name)

            def roundtrip(comp=comp, plan=plan, update=update) -> tuple:
                packet = C.encode_update(update, plan, comp, torch.Generator().manual_seed(0))
                return packet, C.decode_update(packet.data, plan, comp)[0]

            secs = best_seconds(roundtrip, args.repeats)
            packet, decoded = roundtrip()
            size, payload = len(packet.data), packet.payload_bits // 8
            bits, err = per_coordinate(plan, update, decoded, packet.payload_bits)
            print(
                f"{wname:10} {name:11} {mb / secs:9.1f} {copy_s / secs:8.3f} {size:13d} "
                f"{payload:10d} {100 * (size - payload) / size:8.2f}% {bits:10.3f} {err:8.4f}"
            )


if __name__ == "__main__":
    main()
