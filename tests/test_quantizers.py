"""fp16, bf16, int8, nf4 and TernGrad checked against their formats and papers, apart from
their own code: the formats' rounding bounds, QLoRA's published NF4 table, TernGrad's
unbiasedness and variance formula, on Gaussian vectors and on a real cnn4 update."""

import math

import pytest
import torch

import fedbat.compressors as C
from fedbat.errors import PacketError

# QLoRA (Dettmers et al. 2023), appendix E / bitsandbytes' NF4 table, as published
NF4_TABLE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
             0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]  # fmt: skip


def gaussian(n: int = 10_000, seed: int = 0, scale: float = 1e-2) -> torch.Tensor:
    return scale * torch.randn(n, generator=torch.Generator().manual_seed(seed))


def roundtrip(name: str, x: torch.Tensor, seed: int = 0, **params) -> torch.Tensor:
    """``C.roundtrip``, with the payload checked against the fields and the size limit."""
    c = C.build({"name": name, **params})
    fields = c.encode(x, torch.Generator().manual_seed(seed))
    assert sum(f.numel() * f.element_size() for f in fields.values()) <= c.max_payload_bytes(
        x.shape
    )
    return C.roundtrip({"name": name, **params}, x, seed=seed)


@pytest.mark.parametrize("source", ["gaussian", "cnn4"])
def test_half_precision_rounds_to_nearest(source, request):
    x = gaussian() if source == "gaussian" else request.getfixturevalue("cnn4_update")
    for name, bits, tiny in (("fp16", 11, 2.0**-25), ("bf16", 8, 2.0**-134)):
        err = (roundtrip(name, x) - x).abs()
        assert bool((err <= torch.maximum(x.abs() * 2.0**-bits, torch.tensor(tiny))).all()), name
    assert roundtrip("fp16", torch.tensor([1e6, -7e4])).tolist() == [65504.0, -65504.0]


def test_the_nf4_codebook_is_qloras():
    assert torch.allclose(C.build("nf4").codebook, torch.tensor(NF4_TABLE), atol=2e-7)


@pytest.mark.parametrize("source", ["gaussian", "cnn4"])
@pytest.mark.parametrize("name,block", [("int8", 64), ("int8", 7), ("nf4", 64), ("nf4", 33)])
def test_blockwise_error_within_half_a_step_of_each_block(source, name, block, request):
    x = gaussian() if source == "gaussian" else request.getfixturevalue("cnn4_update")
    out = roundtrip(name, x, block=block)
    n = x.numel()
    padded = torch.nn.functional.pad(x.abs(), (0, -n % block)).view(-1, block)
    absmax = padded.amax(1).repeat_interleave(block)[:n]
    book = torch.tensor(NF4_TABLE) if name == "nf4" else torch.arange(-127, 128) / 127
    half_gap = float((book[1:] - book[:-1]).max()) / 2
    assert bool(((out - x).abs() <= absmax * half_gap * (1 + 1e-5) + 1e-12).all())
    assert int(torch.isin(out[x.abs() == absmax], x[x.abs() == absmax]).sum()) > 0  # exact max


@pytest.mark.parametrize("source", ["gaussian", "cnn4"])
@pytest.mark.parametrize("packing", ["trits", "2bit"])
def test_terngrad_is_unbiased_with_the_papers_variance(source, packing, request):
    x = gaussian(2000) if source == "gaussian" else request.getfixturevalue("cnn4_update")[:2000]
    draws = 3000
    ys = torch.stack([roundtrip("terngrad", x, seed, packing=packing) for seed in range(draws)])
    s = x.abs().max()
    var = s * x.abs() - x.square()  # per element: E[y^2] - x^2, y in {0, s sign x}
    assert bool(((ys.mean(0) - x).abs() <= 6 * (var / draws).sqrt() + 1e-6 * x.abs()).all())
    vnmse = float((ys - x).square().sum(1).mean() / x.square().sum())
    theory = float((s * x.abs().sum() - x.square().sum()) / x.square().sum())
    assert vnmse == pytest.approx(theory, rel=0.03)
    trit_bytes = math.ceil(x.numel() / 5) if packing == "trits" else math.ceil(x.numel() / 4)
    c = C.build({"name": "terngrad", "packing": packing})
    assert c.encode(x, torch.Generator())["trits"].numel() == trit_bytes


@pytest.mark.parametrize(
    "name,field,value,match",
    [
        ("fp16", "values", torch.zeros(10, dtype=torch.float32), "dtype torch.float32"),
        ("int8", "scales", -torch.ones(1), "negative scale"),
        ("int8", "scales", torch.tensor([math.inf]), "non-finite"),
        ("nf4", "codes", torch.tensor([255] * 6, dtype=torch.uint8), r"codes': shape"),
        ("terngrad", "trits", torch.tensor([243, 0], dtype=torch.uint8), "above 242"),
        ("terngrad", "scale", -torch.ones(1), "must be >= 0"),
    ],
)
def test_hostile_fields_are_refused(name, field, value, match):
    c = C.build(name)
    fields = c.encode(gaussian(10), torch.Generator())
    fields[field] = value
    with pytest.raises(PacketError, match=match):
        c.decode(fields, torch.Size([10]))


def test_a_2bit_trit_code_of_3_is_refused():
    c = C.build({"name": "terngrad", "packing": "2bit"})
    fields = c.encode(gaussian(8), torch.Generator())
    fields["trits"] = torch.tensor([255, 255], dtype=torch.uint8)
    with pytest.raises(PacketError, match="a code above 2"):
        c.decode(fields, torch.Size([8]))
