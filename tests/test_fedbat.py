import math

import pytest
import torch
from torch import nn

import fedbat.compressors as C
from fedbat.compressors.fedbat import ALPHA_MAX, ALPHA_MIN, FedBATHook, ScaledBinarize, binarize


def test_forward_matches_definition():
    m = torch.tensor([-0.3, -0.1, 0.0, 0.05, 0.1, 0.3])
    alpha = torch.tensor(0.1)
    u = torch.tensor([0.5, 0.99, 0.49, 0.3, 0.0, 0.0])
    # (m/alpha + 1)/2 + u = [-0.5, 0.99, 0.99, 1.05, 1.0, 2.0] -> floor, clamp [0, 1]
    assert binarize(m, alpha, u).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    s = ScaledBinarize.apply(torch.zeros(6), m, alpha, u)
    assert torch.allclose(s, torch.tensor([-0.1, -0.1, -0.1, 0.1, 0.1, 0.1]))


def test_stochastic_rounding_unbiased_inside_and_saturating_outside():
    alpha = torch.tensor(0.02)
    m = torch.tensor([-0.019, -0.01, 0.0, 0.005, 0.0199, 0.05, -0.05])
    g = torch.Generator().manual_seed(0)
    w = torch.zeros(m.shape)
    draws = torch.stack(
        [ScaledBinarize.apply(w, m, alpha, torch.rand(m.shape, generator=g)) for _ in range(20000)]
    )
    mean = draws.mean(0)
    # std of one draw <= alpha; of the mean over 20000 draws <= alpha / 141
    assert torch.allclose(mean[:5], m[:5], atol=4 * 0.02 / math.sqrt(20000))
    assert mean[5].item() == pytest.approx(0.02) and mean[6].item() == pytest.approx(-0.02)


def test_custom_gradients_match_formulas():
    m = torch.tensor([-0.3, -0.05, 0.0, 0.05, 0.3], requires_grad=True)
    alpha = torch.tensor(0.1, requires_grad=True)
    u = torch.tensor([0.2, 0.9, 0.1, 0.6, 0.7])
    out = ScaledBinarize.apply(torch.zeros(5), m, alpha, u)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    out.backward(g)
    b = binarize(m.detach(), alpha.detach(), u)
    assert m.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]  # 1 where |m| <= alpha
    inside = (2 * b - 1) - m.detach() / 0.1
    d_alpha = torch.tensor([-1.0, inside[1], inside[2], inside[3], 1.0])
    assert alpha.grad.item() == pytest.approx(float((g * d_alpha).sum()))


class Textbook(torch.autograd.Function):
    """S(m, alpha) written as the paper's formulas, one op each: the fused operator must
    equal it bit for bit, so that speeding it up never changes a result."""

    @staticmethod
    def forward(ctx, m, alpha, u):
        b = binarize(m, alpha, u)
        ctx.save_for_backward(m, alpha, b)
        return alpha * (2 * b - 1)

    @staticmethod
    def backward(ctx, grad):
        m, alpha, b = ctx.saved_tensors
        inside = m.abs() <= alpha
        d_alpha = torch.where(inside, (2 * b - 1) - m / alpha, torch.sign(m))
        return grad * inside, (grad * d_alpha).sum().reshape(alpha.shape), None


@pytest.mark.parametrize("seed", range(8))
def test_fused_operator_is_bitwise_the_textbook_one(seed):
    g = torch.Generator().manual_seed(seed)
    shape = (64, 32, 3, 3)
    m0 = torch.randn(shape, generator=g) * 0.01
    a = 0.01 * (1 + seed / 10)
    m0.view(-1)[:6] = torch.tensor([a, -a, 0.0, -0.0, a * (1 + 1e-7), -a * (1 - 1e-7)])  # edges
    w, u, grad = torch.randn(shape, generator=g), torch.rand(shape, generator=g), torch.randn(shape)
    got, want = [], []
    for op, out in ((ScaledBinarize, got), (Textbook, want)):
        m, alpha = m0.clone().requires_grad_(), torch.tensor(a, requires_grad=True)
        s = op.apply(w, m, alpha, u) if op is ScaledBinarize else w + op.apply(m, alpha, u)
        s.backward(grad)
        out += [s.detach(), m.grad, alpha.grad]
    for x, y in zip(got, want, strict=True):
        assert torch.equal(x.view(torch.int32), y.view(torch.int32))


class Odd(nn.Module):
    """Not a known model class: a 1d conv and a linear layer with biases and no BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 8, 3, bias=True)
        self.head = nn.Linear(8 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


def test_hook_on_any_module_warmup_switch_and_finalize():
    torch.manual_seed(0)
    model = Odd()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = C.wire_plan(model, min_numel=10)
    names = [s.name for s in plan if s.compressed]
    assert names == ["conv.weight", "head.weight"]
    steps = 10
    hook = C.build({"name": "fedbat", "phi": 0.5}).training_hook(model, names, steps)
    assert isinstance(hook, FedBATHook) and hook.switch_step == 5
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(16, 2, 8), torch.randint(0, 3, (16,))
    layer = hook.layers["conv.weight"]
    for step in range(steps):
        assert layer.binarizing == (step >= 5)  # U = m for the first phi of the steps
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 4:
            m_at_switch = layer.m.detach().abs().mean().item()
        hook.after_step(step)
        if step == 4:
            assert layer.alpha0.item() == pytest.approx(m_at_switch)  # alpha0 = mean|m|
    assert layer.s.grad is not None and layer.s.grad.abs().item() > 0  # the step size learns
    fields = hook.encode_latent(hook.latent())
    # parametrizations are gone and the received weights are back, trainable again
    assert not hasattr(model, "parametrizations") or not model.parametrizations
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) or not k.endswith("weight")
    assert all(p.requires_grad for p in model.parameters())
    alpha = fields["conv.weight"]["scale"].item()
    assert ALPHA_MIN <= alpha <= ALPHA_MAX
    assert fields["conv.weight"]["signs"].numel() == math.ceil(8 * 2 * 3 / 8)


def test_phi_zero_binarizes_from_the_first_step():
    model = Odd()
    hook = C.build({"name": "fedbat", "phi": 0.0}).training_hook(model, ["head.weight"], 4)
    assert hook.layers["head.weight"].binarizing
    assert hook.layers["head.weight"].alpha().item() == pytest.approx(
        ALPHA_MIN
    )  # mean|m| = 0 -> clamp
    hook.encode_latent(hook.latent())


def test_fedbat_downlink_encode_is_stochastic_binarization_with_mean_scale():
    c = C.build("fedbat")
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    f = c.encode(x, torch.Generator().manual_seed(1))
    assert f["scale"].item() == pytest.approx(x.abs().mean().item())
    dec = c.decode(f, x.shape)
    assert torch.allclose(dec.abs(), f["scale"].expand(4096))
    assert c.stats(f)["alpha"] == f["scale"].item()
