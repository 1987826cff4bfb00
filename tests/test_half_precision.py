"""Tensors keep their dtype on the wire: a bf16 or fp16 model (or ``trainer.precision=
bf16-true``) sends its uncompressed tensors in their own dtype, counted by their real bytes;
every compressor takes half-precision input; half-precision packets are validated as fp32
ones are."""

import pytest
import torch
from safetensors.torch import load as st_load
from torch import nn

import fedbat.compressors as C
from fedbat import checkpoint
from fedbat.compressors import TensorSpec
from fedbat.compressors.plan import wire_plan
from fedbat.errors import PacketError
from fedbat.lifecycle import run
from tests.conftest import make_cfg
from tests.helpers import rows

NET = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def half_plan(dtype: torch.dtype) -> list[TensorSpec]:
    return wire_plan(NET.to(dtype))  # 0.weight, 1.weight compressed; biases raw


def update_of(plan: list[TensorSpec], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {s.name: torch.randn(s.shape, generator=g).to(s.dtype) for s in plan}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_model_travels_in_half_under_none(dtype):
    plan = half_plan(dtype)
    update = update_of(plan)
    packet = C.encode_update(update, plan, C.build("none"), torch.Generator())
    groups = st_load(packet.data)
    assert {str(t.dtype) for t in groups.values()} == {str(dtype)}
    # the payload is 2 bytes an element, by hand: 64*32 + 32 + 32*10 + 10 elements
    assert sum(t.numel() * t.element_size() for t in groups.values()) == 2 * 2410
    assert packet.bits == 8 * len(packet.data)
    decoded, _ = C.decode_update(packet.data, plan, C.build("none"))
    for s in plan:
        assert decoded[s.name].dtype == dtype and torch.equal(decoded[s.name], update[s.name])


def test_a_half_packet_is_validated_as_fp32_ones_are():
    plan = half_plan(torch.bfloat16)
    update = update_of(plan)
    # the weights in fp32 (the right shapes, the wrong dtype), the biases as they should be
    liar = [
        TensorSpec(s.name, s.shape, torch.float32 if s.compressed else s.dtype, s.compressed)
        for s in plan
    ]
    fp32 = {s.name: update[s.name].to(s.dtype) for s in liar}
    forged = C.encode_update(fp32, liar, C.build("none"), torch.Generator())
    with pytest.raises(PacketError, match=r"the tensor.s is torch\.bfloat16"):
        C.decode_update(forged.data, plan, C.build("none"))
    update["0.weight"][3, 4] = float("nan")
    bad = C.encode_update(update, plan, C.build("none"), torch.Generator())
    with pytest.raises(PacketError, match=r"0\.weight: field .values.: non-finite values"):
        C.decode_update(bad.data, plan, C.build("none"))
    update["0.weight"][3, 4] = 0.0
    update["0.bias"][0] = float("inf")  # a raw tensor
    bad = C.encode_update(update, plan, C.build("none"), torch.Generator())
    with pytest.raises(PacketError, match=r"0\.bias: field .raw.: non-finite values"):
        C.decode_update(bad.data, plan, C.build("none"))


@pytest.mark.parametrize("name", C.available())
def test_every_compressor_takes_bf16_input(name):
    plan = half_plan(torch.bfloat16)
    update = update_of(plan, seed=1)
    comp = C.build(name)
    packet = C.encode_update(update, plan, comp, torch.Generator().manual_seed(0))
    decoded, _ = C.decode_update(packet.data, plan, comp)
    ref = C.encode_update(
        {k: v.float() for k, v in update.items()},
        [TensorSpec(s.name, s.shape, torch.float32, s.compressed) for s in plan],
        comp,
        torch.Generator().manual_seed(0),
    )
    ref_decoded, _ = C.decode_update(ref.data, wire_plan(NET.float()), comp)
    for s in plan:  # a lossy compressor sees the fp32 values of the bf16 input: the same code
        if s.compressed and not comp.lossless:
            assert torch.equal(decoded[s.name], ref_decoded[s.name]), s.name
        else:
            assert decoded[s.name].dtype == torch.bfloat16


def test_bf16_true_trains_a_bf16_model_at_half_the_bits(tmp_path):
    args = ["fed.rounds=2", "data.num_clients=4", "fed.clients_per_round=2"]
    for precision in ("32-true", "bf16-true"):
        run(make_cfg(tmp_path / precision, *args, f"trainer.precision={precision}"))
    full, half = rows(tmp_path / "32-true"), rows(tmp_path / "bf16-true")
    state = checkpoint.load(tmp_path / "bf16-true" / "checkpoint.pt")["server"]["global"]
    floats = [t for t in state.values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.bfloat16 for t in floats)
    assert float(half[-1]["test/acc"]) > 0.5
    # every float travels in 2 bytes instead of 4: the payload halves, the header stays
    ratio = int(half[-1]["bits/uplink"]) / int(full[-1]["bits/uplink"])
    assert 0.5 < ratio < 0.52, ratio


def test_a_half_update_beyond_its_dtypes_range_in_norm_is_measured_not_overflowed():
    """The update-norm bound is not taken in the update's dtype: a float16 update of a
    million 100s has norm 1e5, past float16's 65504, and is within a bound of 1e6 (by hand:
    sqrt(1e6) * 100); within 0.01% of the bound the float64 norm decides."""
    from fedbat.intake import check_scale

    big = {"w": torch.full((10**6,), 100.0, dtype=torch.float16)}
    check_scale(big, 1e6)  # accepted
    check_scale(big, 1.0001e5)
    with pytest.raises(PacketError, match="update norm 1e\\+05 exceeds the bound 9e\\+04"):
        check_scale(big, 9e4)
    with pytest.raises(PacketError, match="update norm 1e\\+05 exceeds the bound 1e\\+05"):
        check_scale(big, 0.9999e5)
    huge = {"w": torch.full((4,), 1e30)}  # its float32 sum of squares overflows
    with pytest.raises(PacketError, match="update norm 2e\\+30 exceeds the bound 1e\\+30"):
        check_scale(huge, 1e30)
    check_scale(huge, 3e30)
