"""``load_model``'s fast path must be ``load_state_dict``: same tensors, same errors."""

import pytest
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from fedbat.compressors.plan import load_model
from fedbat.models import build


def _fresh_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            out[name] = torch.randn(t.shape, generator=g, dtype=t.dtype)
        else:
            out[name] = torch.randint(0, 9, t.shape, generator=g, dtype=t.dtype)
    return out


def _pair(name: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a = build(name, (3, 32, 32), 10)
    torch.manual_seed(0)
    return a, build(name, (3, 32, 32), 10)


@pytest.mark.parametrize("name", ["resnet10", "cnn4", "mlp"])
def test_fast_path_loads_what_load_state_dict_loads_bitwise(name):
    fast, slow = _pair(name)
    fast.metric = MulticlassAccuracy(num_classes=10)  # a module owning no tensors of the state
    state = _fresh_state(slow, 1)
    load_model(fast, state)
    slow.load_state_dict(state)
    for (n, a), b in zip(fast.state_dict().items(), slow.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), n
    # the copies are the model's own tensors, not the state's: training must not write back
    p = next(fast.parameters())
    assert p.data_ptr() != state[next(iter(state))].data_ptr()
    assert p.requires_grad and p.grad_fn is None


def _expect_same_error(model: nn.Module, twin: nn.Module, state: dict) -> None:
    with pytest.raises(RuntimeError) as fast:
        load_model(model, state)
    with pytest.raises(RuntimeError) as slow:
        twin.load_state_dict(state)
    assert str(fast.value) == str(slow.value)


def test_missing_unexpected_and_misshaped_keys_raise_load_state_dicts_errors():
    a, b = _pair("mlp")
    state = _fresh_state(a, 2)
    first = next(iter(state))
    _expect_same_error(a, b, {k: v for k, v in state.items() if k != first})
    _expect_same_error(a, b, state | {"stray.weight": torch.zeros(1)})
    _expect_same_error(a, b, state | {first: torch.zeros(3, 3)})


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight


def test_a_tied_tensor_named_once_loads_into_both_names():
    model = _Tied()
    w = torch.randn(5, 4)
    load_model(model, {"embed.weight": w})
    assert torch.equal(model.head.weight, w) and model.head.weight is model.embed.weight


def test_a_module_with_a_load_hook_is_loaded_by_load_state_dict():
    model = nn.Sequential(nn.Linear(2, 2))
    seen = []
    model[0].register_load_state_dict_pre_hook(lambda *args: seen.append(args[2]))
    load_model(model, {"0.weight": torch.ones(2, 2), "0.bias": torch.zeros(2)})
    assert seen == ["0."] and torch.equal(model[0].weight, torch.ones(2, 2))
