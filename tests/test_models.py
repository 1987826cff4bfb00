import pytest
import torch
from torch import nn

from fedbat.errors import ConfigError
from fedbat.models import build


@pytest.mark.parametrize(
    "name,shape",
    [
        ("cnn4", (1, 28, 28)),
        ("cnn4", (3, 32, 32)),
        ("resnet10", (3, 32, 32)),
        ("mlp", (1, 8, 8)),
        ("cnn", (1, 8, 8)),
    ],
)
def test_models_forward_any_input(name, shape):
    model = build(name, shape, 7)
    assert model(torch.randn(2, *shape)).shape == (2, 7)


@pytest.mark.parametrize("name,shape", [("cnn4", (1, 28, 28)), ("resnet10", (3, 32, 32))])
def test_paper_models_have_no_biases_and_small_init(name, shape):
    torch.manual_seed(0)
    model = build(name, shape, 10)
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert all(m.bias is None for m in layers)
    big = max(layers, key=lambda m: m.weight.numel())
    assert abs(big.weight.std().item() - 0.01) < 0.001  # N(0, 0.01) as in the paper


def test_resnet10_is_basic_block_1111():
    model = build("resnet10", (3, 32, 32), 10)
    assert len(model.layers) == 4
    assert [b.conv1.out_channels for b in model.layers] == [64, 128, 256, 512]


def test_unknown_model_lists_available():
    with pytest.raises(ConfigError, match="available: cnn4, resnet10, mlp, cnn"):
        build("vgg", (1, 8, 8), 10)
