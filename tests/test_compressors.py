import math
import zlib

import numpy as np
import pytest
import torch

import fedbat.compressors as C
from fedbat.compressors.bits import pack_bits, pack_uint, unpack_bits, unpack_uint
from fedbat.errors import ConfigError, PacketError
from fedbat.models import build as build_model

LOSSY = ["fedbat", "topk", "qsgd", "signsgd", "ef_signsgd"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_pack_bits_layout_matches_numpy_msb_first():
    bits = torch.rand(1001, generator=gen()) < 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 126
    assert np.array_equal(packed.numpy(), np.packbits(bits.numpy()))
    assert pack_bits(torch.tensor([True] + [False] * 7)).item() == 0b1000_0000
    assert torch.equal(unpack_bits(packed, 1001), bits)


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 7, 8])
def test_pack_uint_roundtrip(width):
    v = torch.randint(0, 2**width, (333,), generator=gen())
    packed = pack_uint(v, width)
    assert packed.numel() == math.ceil(333 * width / 8)
    assert torch.equal(unpack_uint(packed, width, 333), v)
    # the documented layout: each integer's bits, most significant first, one after another
    bits = [(int(x) >> (width - 1 - j)) & 1 for x in v for j in range(width)]
    assert np.array_equal(packed.numpy(), np.packbits(np.array(bits, dtype=np.uint8)))


def test_none_is_lossless_fp32():
    c = C.build("none")
    x = torch.randn(10, 7)
    fields = c.encode(x, gen())
    assert fields["values"].dtype == torch.float32
    assert torch.equal(c.decode(fields, x.shape), x)


def test_signsgd_exact_layout_and_scale():
    c = C.build("signsgd")
    x = torch.tensor([0.5, -1.0, 2.0, -0.5, 0.0, 1.0, -3.0, 4.0, -1.0])
    f = c.encode(x, gen())
    assert f["signs"].tolist() == [0b10101101, 0b00000000]
    assert f["scale"].item() == pytest.approx(x.abs().mean().item())
    dec = c.decode(f, x.shape)
    assert torch.equal(dec.sign(), torch.where(x >= 0, 1.0, -1.0))


@pytest.mark.parametrize("ratio,layout", [(0.01, "indices"), (0.2, "bitmap")])
def test_topk_keeps_largest_in_cheapest_layout(ratio, layout):
    c = C.build({"name": "topk", "ratio": ratio})
    x = torch.randn(1000, generator=gen())
    f = c.encode(x, gen())
    assert layout in f
    dec = c.decode(f, x.shape)
    k = math.ceil(ratio * 1000)
    kept = dec != 0
    assert int(kept.sum()) == k
    assert torch.equal(dec[kept], x[kept])
    assert x[~kept].abs().max() <= x[kept].abs().min()


def test_qsgd_bits_and_unbiasedness():
    c = C.build({"name": "qsgd", "levels": 4, "bucket_size": 64})
    x = torch.randn(300, generator=gen())
    f = c.encode(x, gen())
    assert c.width == 4 and f["levels"].numel() == math.ceil(300 * 4 / 8)
    assert f["norms"].numel() == math.ceil(300 / 64)
    g = gen(1)
    mean = torch.stack([c.decode(c.encode(x, g), x.shape) for _ in range(4000)]).mean(0)
    # per-element std of one draw <= norm/s ~ 2; over 4000 draws the mean's std is ~0.03
    assert (mean - x).abs().max() < 0.15
    assert (mean - x).abs().mean() < 0.03


def test_qsgd_deflate_is_the_same_quantization_in_fewer_bytes():
    fixed = C.build("qsgd")
    deflate = C.build({"name": "qsgd", "coding": "deflate"})
    x = torch.randn(20_000, generator=gen())
    f, z = fixed.encode(x, gen()), deflate.encode(x, gen())
    assert set(z) == {"norms", "levels_deflate"}
    # levels of a Gaussian cluster near 0 (entropy ~1.6 bits): deflate nearly halves 4 bits
    assert z["levels_deflate"].numel() < 0.6 * f["levels"].numel()
    assert torch.equal(deflate.decode(z, x.shape), fixed.decode(f, x.shape))
    assert torch.equal(deflate.decode(f, x.shape), fixed.decode(f, x.shape))  # either form
    with pytest.raises(PacketError, match="missing field 'levels'"):
        fixed.decode(z, x.shape)  # a fixed-coding receiver accepts no deflated levels


def _zfield(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


@pytest.mark.parametrize(
    "levels_deflate",
    [
        _zfield(b"not a deflate stream"),
        _zfield(zlib.compress(bytes(10_000))[:-6]),  # truncated
        _zfield(zlib.compress(bytes(100_000))),  # inflates past the expected size (a bomb)
        _zfield(zlib.compress(bytes(100))),  # inflates short of it
        _zfield(bytes(10_000)),  # no shorter than the fixed form
    ],
    ids=["garbage", "truncated", "bomb", "short", "not-shorter"],
)
def test_qsgd_rejects_bad_deflated_levels(levels_deflate):
    c = C.build({"name": "qsgd", "coding": "deflate"})
    fields = {"norms": torch.ones(157), "levels_deflate": levels_deflate}
    with pytest.raises(PacketError, match="levels_deflate"):
        c.decode(fields, torch.Size([20_000]))


def test_error_feedback_state_survives_rounds():
    c = C.build("ef_signsgd")
    plan = [C.TensorSpec("w", torch.Size([64]), torch.float32, True)]
    ef = C.Memory()
    x = torch.randn(64, generator=gen())
    sent = torch.zeros(64)
    for _ in range(50):  # with error feedback the sum of what was sent tracks the sum of x
        p = C.encode_update({"w": x}, plan, c, gen(), ef, holder=7)
        sent += C.decode_update(p.data, plan, c)[0]["w"]
    assert set(ef.residuals) == {"7/w"}
    assert (sent / 50 - x).abs().mean() < 0.1  # signsgd alone stays off by mean |x - scale|
    assert torch.allclose(sent + ef.residuals["7/w"], 50 * x, atol=1e-4)


def test_cnn4_payload_bits_match_the_issue():
    """cnn4/FMNIST: 389,920 weights in 5 tensors + 960 BN affine + 960 BN stats + 4 int64."""
    model = build_model("cnn4", (1, 28, 28), 10)
    plan = C.wire_plan(model, min_numel=100)
    compressed = [s for s in plan if s.compressed]
    assert len(compressed) == 5 and sum(s.numel for s in compressed) == 389_920
    update = {k: torch.randn(v.shape).to(v.dtype) for k, v in model.state_dict().items()}
    none = C.encode_update(update, plan, C.build("none"), gen())
    fedbat = C.encode_update(update, plan, C.build("fedbat"), gen())
    assert none.payload_bits == 12_539_136
    assert fedbat.payload_bits == 451_776
    assert none.payload_bits / fedbat.payload_bits == pytest.approx(27.75, abs=0.01)
    assert fedbat.bits == 8 * len(fedbat.data) > fedbat.payload_bits  # container overhead counted


@pytest.mark.parametrize("name", C.available())
def test_every_compressor_roundtrips_through_bytes(name):
    model = build_model("cnn", (1, 8, 8), 10)
    plan = C.wire_plan(model)
    comp = C.build(name)
    update = {k: torch.randn(v.shape).to(v.dtype) for k, v in model.state_dict().items()}
    packet = C.encode_update(update, plan, comp, gen())
    decoded, _ = C.decode_update(packet.data, plan, comp)
    for spec in plan:
        assert decoded[spec.name].shape == spec.shape
        if not spec.compressed or comp.lossless:
            assert torch.equal(decoded[spec.name], update[spec.name])


def _fedbat_packet():
    model = build_model("cnn", (1, 8, 8), 10)
    plan = C.wire_plan(model)
    comp = C.build("fedbat")
    update = {k: torch.randn(v.shape).to(v.dtype) for k, v in model.state_dict().items()}
    return plan, comp, update


def _repack(plan, comp, update, mutate):
    from fedbat.compressors.packet import pack

    fields = {
        s.name: comp.encode(update[s.name], gen()) if s.compressed else {"raw": update[s.name]}
        for s in plan
    }
    mutate(fields[next(s.name for s in plan if s.compressed)])
    return pack(fields, comp).data


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda f: f.update(scale=torch.tensor([float("nan")])), "non-finite"),
        (lambda f: f.update(scale=torch.tensor([float("inf")])), "non-finite"),
        (lambda f: f.update(scale=torch.tensor([1.0], dtype=torch.float64)), "dtype"),
        (lambda f: f.update(signs=f["signs"][:-1]), "shape"),
        (lambda f: f.pop("scale"), "missing field"),
    ],
)
def test_malformed_packets_raise_clear_errors(mutate, match):
    plan, comp, update = _fedbat_packet()
    with pytest.raises(PacketError, match=match):
        C.decode_update(_repack(plan, comp, update, mutate), plan, comp)


def _retag(data: bytes, **meta: str) -> bytes:
    """The same packet with header metadata changed (a forged or damaged header)."""
    from safetensors.torch import load, save

    return save(load(data), metadata=C.packet.read_metadata(data) | meta)


@pytest.mark.parametrize(
    "meta,match",
    [
        ({"version": "1"}, r"format 'fedbat.packet' v'1': this fedbat reads v2"),
        ({"plan": "deadbeef"}, r"packet for another model \(plan 'deadbeef'\)"),
        ({"groups": "signs.U8 scale.F32 raw.F32 raw.I64 extra.F32"}, "groups"),
        ({"layout": "0:1,1:1"}, r"malformed layout: 1 tensors, the plan has"),
        ({"layout": "x"}, "malformed layout"),
    ],
)
def test_forged_layouts_are_refused(meta, match):
    """Version 2 sends no names per field: the header's plan digest, groups and layout
    are all checked, and every element of every group must be used exactly once."""
    plan, comp, update = _fedbat_packet()
    data = C.encode_update(update, plan, comp, gen()).data
    with pytest.raises(PacketError, match=match):
        C.decode_update(_retag(data, **meta), plan, comp)


def test_a_layout_must_use_every_element_exactly_once():
    plan, comp, update = _fedbat_packet()
    data = C.encode_update(update, plan, comp, gen()).data
    layout = C.packet.read_metadata(data)["layout"].split(";")
    first = next(i for i, e in enumerate(layout) if e)  # the first compressed tensor
    signs, scale = layout[first].split(",")
    n = int(signs.split(":")[1])
    for forged, match in [
        (f"0:{n - 1},{scale}", "left over"),  # fewer signs than sent
        (f"0:{n + 10**6},{scale}", "elements of 'signs.U8'"),  # more than sent
        (f"{signs},{signs},{scale}", "elements of 'signs.U8'"),  # one field twice
        (f"9:{n},{scale}", "no group"),
    ]:
        bad = ";".join([*layout[:first], forged, *layout[first + 1 :]])
        with pytest.raises(PacketError, match=match):
            C.decode_update(_retag(data, layout=bad), plan, comp)


def test_truncated_and_foreign_packets_rejected():
    plan, comp, update = _fedbat_packet()
    data = C.encode_update(update, plan, comp, gen()).data
    with pytest.raises(PacketError):
        C.decode_update(data[: len(data) // 2], plan, comp)
    with pytest.raises(PacketError, match="compressor"):
        C.decode_update(data, plan, C.build("signsgd"))
    with pytest.raises(PacketError, match="exceeds"):
        C.decode_update(data + bytes(C.packet.max_packet_bytes(plan, comp)), plan, comp)


def test_registry_unknown_name_lists_all():
    every = ", ".join(C.available())
    with pytest.raises(
        ConfigError, match=rf"compressor='tpok': unknown compressor; available: {every}$"
    ):
        C.build("tpok")


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"name": "topk", "ratio": 1.5}, r"compressor\.ratio=1\.5.*\(0\.0, 1\.0\]"),
        ({"name": "topk", "ratio": "big"}, r"compressor\.ratio='big'"),
        ({"name": "qsgd", "levels": 0}, r"compressor\.levels=0"),
        ({"name": "qsgd", "levels": 128}, r"compressor\.levels=128.*\[1, 127\]"),
        ({"name": "qsgd", "coding": "gzip"}, r"compressor\.coding='gzip'.*fixed.*deflate"),
        ({"name": "fedbat", "phi": 2}, r"compressor\.phi=2"),
        ({"name": "fedbat", "rho": -1}, r"compressor\.rho=-1"),
        ({"name": "signsgd", "ratio": 0.1}, r"compressor\.ratio: not a parameter"),
    ],
)
def test_parameters_validated(spec, match):
    with pytest.raises(ConfigError, match=match):
        C.build(spec)


def test_direction_overrides():
    up, down = C.build_pair({"name": "topk", "ratio": 0.05, "uplink": None, "downlink": "none"})
    assert (up.name, up.ratio, down.name) == ("topk", 0.05, "none")
    up, down = C.build_pair({"name": "none", "downlink": {"name": "qsgd", "levels": 2}})
    assert down.levels == 2 and up.name == "none"
    with pytest.raises(ConfigError, match=r"compressor\.downlink='nope'"):
        C.build_pair({"name": "none", "downlink": "nope"})


def _qsgd_deflate_packet(mutate):
    """A real deflate-coded QSGD packet of a cnn update, with its largest tensor's fields
    changed by ``mutate``."""
    from fedbat.compressors.packet import pack

    model = build_model("cnn", (1, 8, 8), 10)
    plan = C.wire_plan(model)
    comp = C.build({"name": "qsgd", "coding": "deflate"})
    update = {k: torch.randn(v.shape).to(v.dtype) * 1e-3 for k, v in model.state_dict().items()}
    fields = C.packet.unpack(C.encode_update(update, plan, comp, gen()).data, plan, comp)
    largest = max((s for s in plan if s.compressed), key=lambda s: s.numel).name
    assert "levels_deflate" in fields[largest]
    mutate(fields[largest])
    return plan, comp, pack(fields, comp).data


def _append(field: torch.Tensor, extra: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(field.numpy().tobytes() + extra), dtype=torch.uint8)


@pytest.mark.parametrize(
    "mutate,match",
    [
        # bytes after the end of the deflate stream: inflate "exactly and no further"
        (lambda f: f.update(levels_deflate=_append(f["levels_deflate"], b"\x00junk")), "exactly"),
        # a valid second deflate stream appended
        (
            lambda f: f.update(
                levels_deflate=_append(f["levels_deflate"], zlib.compress(b"\x00" * 10))
            ),
            "exactly",
        ),
        # the fixed form beside the deflated one: two encodings of one tensor
        (
            lambda f: f.update(levels=torch.zeros(1, dtype=torch.uint8)),
            r"unexpected field\(s\) \['levels'\]",
        ),
        # an extra field, even a NaN the decoder would never read
        (
            lambda f: f.update(note=torch.tensor([float("nan")])),
            r"unexpected field\(s\) \['note'\]",
        ),
    ],
    ids=["trailing-bytes", "second-stream", "levels-and-deflate", "extra-nan-field"],
)
def test_qsgd_packets_with_smuggled_data_are_rejected(mutate, match):
    plan, comp, data = _qsgd_deflate_packet(mutate)
    with pytest.raises(PacketError, match=match):
        C.decode_update(data, plan, comp)


def test_extra_field_in_a_sign_packet_is_rejected():
    plan, comp, update = _fedbat_packet()
    data = _repack(plan, comp, update, lambda f: f.update(extra=torch.zeros(3)))
    with pytest.raises(PacketError, match=r"unexpected field\(s\) \['extra'\]"):
        C.decode_update(data, plan, comp)


def test_duplicate_keys_in_the_header_are_rejected():
    plan, comp, update = _fedbat_packet()
    data = C.encode_update(update, plan, comp, gen()).data
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n].decode()
    # the same metadata key twice, the second claiming another compressor; same length
    forged = header.replace('"compressor":"fedbat"', '"compressor":"fedbat","format":"x"', 1)
    forged = forged.rstrip()[:-1] + ',"__metadata__":{}}'
    forged = forged.ljust(len(forged) + (-len(forged)) % 8).encode()
    bad = len(forged).to_bytes(8, "little") + forged + data[8 + n :]
    with pytest.raises(PacketError, match="duplicate key"):
        C.decode_update(bad, plan, comp)


def test_empty_packet_says_so():
    plan, comp, _ = _fedbat_packet()
    with pytest.raises(PacketError, match=r"^empty packet$"):
        C.decode_update(b"", plan, comp)


@pytest.mark.parametrize("name", C.available())
def test_size_limit_is_derived_from_the_plan_and_compressor(name):
    """A real cnn4 packet sits within 15% of its limit, and one byte past the limit is
    rejected (the limit was 55x a FedBAT packet when it ignored the compressor)."""
    model = build_model("cnn4", (1, 28, 28), 10)
    plan, comp = C.wire_plan(model), C.build(name)
    update = {k: torch.randn(v.shape).to(v.dtype) for k, v in model.state_dict().items()}
    data = C.encode_update(update, plan, comp, gen()).data
    limit = C.packet.max_packet_bytes(plan, comp)
    assert len(data) <= limit < 1.15 * len(data), (len(data), limit)
    with pytest.raises(PacketError, match="exceeds"):
        C.decode_update(data + bytes(limit - len(data) + 1), plan, comp)


def test_packets_are_safetensors_files_laid_out_as_the_library_writes_them():
    """``serialize`` writes groups part by part; safetensors' own writer, given the same
    groups concatenated, gives the same header (less the metadata, whose order its hash
    map does not keep), the same data bytes and the same size."""
    import json
    import random

    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from fedbat.compressors.packet import read_metadata, serialize

    def parts(data: bytes) -> tuple[dict, bytes]:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        header.pop("__metadata__")
        return header, data[8 + n :]

    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8,
              torch.int32, torch.bool, torch.int8, torch.int16, torch.float64]  # fmt: skip
    rng, g = random.Random(0), gen(0)
    for trial in range(100):
        groups = {}
        for i in range(rng.randint(1, 6)):
            dt = rng.choice(dtypes)
            groups[f"{rng.choice('abxyz')}{i}.{dt}"] = [
                (10 * torch.randn(rng.randint(1, 50), generator=g)).to(dt)
                for _ in range(rng.randint(1, 3))
            ]
        meta = {"format": "x", "layout": f"0:1;;{trial}"}
        ours = serialize(groups, meta)
        theirs = st_save({k: torch.cat(v) for k, v in groups.items()}, metadata=meta)
        assert len(ours) == len(theirs) and parts(ours) == parts(theirs), trial
        assert read_metadata(ours) == meta
        loaded = st_load(ours)
        assert all(torch.equal(loaded[k], torch.cat(v)) for k, v in groups.items())
