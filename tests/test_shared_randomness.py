"""rand-k and DRIVE, whose randomness both ends derive (``SharedSeed``) and never send,
checked against their papers: unbiasedness, vNMSE n/k - 1 (rand-k) and pi/2 - 1 (DRIVE,
times n/d when the tensor is zero-padded to d), on Gaussian vectors and a real cnn4 update;
and the seed's derivation: equal on both ends, different per round, sender and tensor."""

import math

import pytest
import torch

import fedbat.compressors as C
from fedbat.compressors.drive import hadamard
from fedbat.compressors.update import SharedSeed
from fedbat.errors import PacketError
from tests.test_quantizers import gaussian


def draws(spec, x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([C.roundtrip(spec, x, seed=0, round=r) for r in range(n)])


def test_the_hadamard_transform_is_orthogonal_and_its_own_inverse():
    d = 64
    h = torch.stack([hadamard(torch.eye(d)[i]) for i in range(d)])
    entries = torch.full((d, d), 1 / math.sqrt(d))
    assert torch.allclose(h.abs(), entries, atol=1e-6)  # +-1/sqrt(d): Sylvester's matrix
    assert torch.allclose(h @ h.T, torch.eye(d), atol=1e-5)
    x = torch.randn(d)
    assert torch.allclose(hadamard(hadamard(x)), x, atol=1e-5)


@pytest.mark.parametrize("source", ["gaussian", "cnn4"])
@pytest.mark.parametrize("ratio", [0.1, 0.25])
def test_randk_is_unbiased_with_variance_n_over_k_minus_one(source, ratio, request):
    x = gaussian(2000) if source == "gaussian" else request.getfixturevalue("cnn4_update")[:2000]
    n, k = x.numel(), math.ceil(ratio * x.numel())
    ys = draws({"name": "randk", "ratio": ratio}, x, 2000)
    assert bool((ys != 0).sum(1).eq(k).all())  # k coordinates a draw, no more
    var = x.square() * (n / k - 1)  # per coordinate: x^2 (n/k) - x^2
    assert bool(((ys.mean(0) - x).abs() <= 6 * (var / len(ys)).sqrt() + 1e-6 * x.abs()).all())
    vnmse = float((ys - x).square().sum(1).mean() / x.square().sum())
    assert vnmse == pytest.approx(n / k - 1, rel=0.05)


def test_biased_randk_sends_the_values_as_they_are():
    x = gaussian(100)
    y = C.roundtrip({"name": "randk", "ratio": 0.2, "unbiased": False}, x)
    kept = y != 0
    assert int(kept.sum()) == 20 and torch.equal(y[kept], x[kept])


@pytest.mark.parametrize("source,n", [("gaussian", 4096), ("cnn4", 32768), ("cnn4", None)])
def test_drive_is_unbiased_with_vnmse_pi_over_2_minus_1(source, n, request):
    """Whatever x: pi/2 - 1 (the paper's limit) for blocks of 4,096 and more; the whole cnn4
    tensor (294,912 = 2^18 + 2^15) is two such blocks."""
    x = gaussian(n) if source == "gaussian" else request.getfixturevalue("cnn4_update")[:n]
    ys = draws("drive", x, 300 if n else 80)  # the whole tensor: 80 draws concentrate
    vnmse = float((ys - x).square().sum(1).mean() / x.square().sum())
    assert vnmse == pytest.approx(math.pi / 2 - 1, rel=0.04)
    sd = math.sqrt((math.pi / 2 - 1) * float(x.square().sum()) / x.numel() / len(ys))
    assert float((ys.mean(0) - x).abs().max()) <= 7 * sd
    assert C.build("drive").max_payload_bytes(x.shape) == math.ceil(x.numel() / 8) + 4 * (
        1 if n else 2
    )


def test_drive_pads_only_the_rest_under_1024_and_stays_unbiased():
    """1000 elements: one block padded to 1,024 (its error spreads over the 1,024, so the
    1,000 kept carry 1000/1024 of pi/2 - 1); one element is sent exactly (S = x^2 / |x|)."""
    assert torch.equal(C.roundtrip("drive", torch.tensor([-0.25])), torch.tensor([-0.25]))
    x = gaussian(1000)
    ys = draws("drive", x, 600)
    vnmse = float((ys - x).square().sum(1).mean() / x.square().sum())
    assert vnmse == pytest.approx((math.pi / 2 - 1) * 1000 / 1024, rel=0.04)
    sd = math.sqrt((math.pi / 2 - 1) * float(x.square().sum()) / 1024 / len(ys))
    assert float((ys.mean(0) - x).abs().max()) <= 6 * sd
    assert C.build("drive").max_payload_bytes((1000,)) == 1024 // 8 + 4


def test_shared_seeds_differ_by_round_sender_and_tensor_and_agree_on_both_ends():
    base = SharedSeed(0, 3, 7)
    draw = [torch.randint(0, 2**31, (4,), generator=s.generator(name)) for s, name in
            [(base, "w"), (SharedSeed(0, 3, 7), "w"), (SharedSeed(0, 4, 7), "w"),
             (SharedSeed(0, 3, 8), "w"), (base, "v"), (SharedSeed(1, 3, 7), "w")]]  # fmt: skip
    assert torch.equal(draw[0], draw[1])
    assert all(not torch.equal(draw[0], d) for d in draw[2:])


def test_a_receiver_with_another_seed_decodes_something_else():
    """The indices really are re-derived, not sent: decoding with the wrong link's seed
    scatters the same values elsewhere."""
    c, x = C.build({"name": "randk", "ratio": 0.1}), gaussian(200)
    fields = c.encode(x, torch.Generator(), shared=SharedSeed(0, 0, 1).generator("x"))
    right = c.decode(fields, x.shape, shared=SharedSeed(0, 0, 1).generator("x"))
    wrong = c.decode(fields, x.shape, shared=SharedSeed(0, 0, 2).generator("x"))
    assert not torch.equal(right, wrong) and torch.equal(right.sort().values, wrong.sort().values)


@pytest.mark.parametrize(
    "name,field,value,match",
    [
        ("randk", "values", torch.zeros(5), "shape"),
        ("randk", "values", torch.tensor([math.nan] * 10), "non-finite"),
        ("drive", "scale", -torch.ones(1), "negative scale"),
        ("drive", "signs", torch.zeros(3, dtype=torch.uint8), "shape"),
    ],
)
def test_hostile_fields_are_refused(name, field, value, match):
    c, g = C.build({"name": name, "ratio": 0.1} if name == "randk" else name), torch.Generator()
    fields = c.encode(gaussian(100), g, shared=SharedSeed(0, 0).generator("x"))
    fields[field] = value
    with pytest.raises(PacketError, match=match):
        c.decode(fields, torch.Size([100]), shared=SharedSeed(0, 0).generator("x"))


# Max (1960), "Quantizing for minimum distortion", table I: the Lloyd-Max quantizer of N(0, 1)
MAX_1960 = {1: ([0.7979], 0.3634), 2: ([0.4528, 1.510], 0.1175),
            3: ([0.2451, 0.7560, 1.344, 2.152], 0.03455)}  # fmt: skip


@pytest.mark.parametrize("bits", sorted(MAX_1960))
def test_the_lloyd_max_centroids_are_maxs(bits):
    from fedbat.compressors.eden import lloyd_max

    centroids, distortion = lloyd_max(bits)
    positive, want = MAX_1960[bits]
    assert centroids[len(centroids) // 2 :].tolist() == pytest.approx(positive, abs=6e-4)
    assert torch.allclose(centroids, -centroids.flip(0))
    assert distortion == pytest.approx(want, abs=6e-5)


@pytest.mark.parametrize("source", ["gaussian", "cnn4"])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_eden_vnmse_is_d_over_1_minus_d(source, bits, request):
    from fedbat.compressors.eden import lloyd_max

    x = gaussian(4096) if source == "gaussian" else request.getfixturevalue("cnn4_update")[:32768]
    ys = draws({"name": "eden", "bits": bits}, x, 100 if source == "gaussian" else 60)
    distortion = lloyd_max(bits)[1]
    vnmse = float((ys - x).square().sum(1).mean() / x.square().sum())
    assert vnmse == pytest.approx(distortion / (1 - distortion), rel=0.05)
    fields = C.build({"name": "eden", "bits": bits}).encode(
        x, torch.Generator(), shared=SharedSeed(0, 0).generator("x")
    )
    assert fields["low"].numel() == x.numel() * bits // 8  # b bits a coordinate, exactly


def test_fractional_eden_splits_the_bits_and_stays_unbiased():
    x = gaussian(4096)
    ys = draws({"name": "eden", "bits": 1.5}, x, 300)
    vnmse = float((ys - x).square().sum(1).mean() / x.square().sum())
    assert 0.1331 < vnmse < 0.5708  # between 2 bits' and 1 bit's
    sd = math.sqrt(vnmse * float(x.square().sum()) / x.numel() / len(ys))
    assert float((ys.mean(0) - x).abs().max()) <= 6 * sd
    fields = C.build({"name": "eden", "bits": 1.5}).encode(
        x, torch.Generator(), shared=SharedSeed(0, 0).generator("x")
    )
    sent = 8 * (fields["low"].numel() + fields["high"].numel())
    assert sent / x.numel() == pytest.approx(1.5, rel=0.03)  # a Bernoulli(0.5) share at 2 bits


@pytest.mark.parametrize("bits", [0, -1, 8.5, "two"])
def test_eden_bits_out_of_range_are_refused(bits):
    from fedbat.errors import ConfigError

    with pytest.raises(ConfigError, match="bits"):
        C.build({"name": "eden", "bits": bits})


def test_eden_hostile_fields_are_refused():
    c, x, shared = C.build({"name": "eden", "bits": 2}), gaussian(100), SharedSeed(0, 0)
    fields = c.encode(x, torch.Generator(), shared=shared.generator("x"))
    for key, value, match in [("low", torch.zeros(3, dtype=torch.uint8), "shape"),
                              ("scale", -torch.ones(1), "negative scale")]:  # fmt: skip
        bad = dict(fields) | {key: value}
        with pytest.raises(PacketError, match=match):
            c.decode(bad, x.shape, shared=shared.generator("x"))
