"""The wire plan: which of a model's tensors travel, in what order, and which of those are
compressed (the rest travel raw in their own dtype). Both sides build the same plan from
the same model and config; a packet is checked against the receiver's."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch

import torch
from torch import nn

from fedbat.errors import ConfigError

COMPRESSIBLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model's state: how it travels."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    compressed: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def module_types(names: Sequence[str]) -> tuple[type[nn.Module], ...]:
    """``torch.nn`` module classes by name (``["Linear", "Embedding"]``); unknown names fail
    in one line."""
    out = []
    for name in names:
        cls = getattr(nn, str(name), None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ConfigError(f"policy.modules: {name!r} is not a torch.nn module class")
        out.append(cls)
    return tuple(out)


def wire_plan(
    model: nn.Module,
    min_numel: int = 100,
    modules: Sequence[type[nn.Module]] = COMPRESSIBLE,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    frozen: Collection[str] = (),
) -> list[TensorSpec]:
    """The tensors that travel each round, and which of them are compressed.

    Only what trains travels: a parameter with ``requires_grad=False`` and the tensors named
    in ``frozen`` (buffers that local training leaves as they are) stay where the model a
    client first receives put them (:func:`frozen_specs`). Of the rest, the ``weight`` of
    every module of the ``modules`` types, and every parameter whose name matches an
    ``include`` pattern (fnmatch), unless it matches an ``exclude`` pattern or has fewer than
    ``min_numel`` elements, is compressed; everything else (BN, biases, buffers, small
    tensors) travels raw, in its own dtype.

    >>> net = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 50))
    >>> [(s.name, s.compressed) for s in wire_plan(net, 100, [nn.Embedding])]
    [('0.weight', True), ('1.weight', False), ('1.bias', False)]
    >>> _ = net[0].requires_grad_(False)  # a frozen embedding
    >>> [s.name for s in wire_plan(net, 100, [nn.Embedding])]
    ['1.weight', '1.bias']
    """
    params = dict(model.named_parameters())
    stay = set(frozen) | {n for n, p in params.items() if not p.requires_grad} | set(aliases(model))
    chosen = {
        f"{mod_name}.weight" if mod_name else "weight"
        for mod_name, mod in model.named_modules()
        if isinstance(mod, tuple(modules))
        and isinstance(getattr(mod, "weight", None), torch.Tensor)
    }
    chosen |= {n for n in params if any(fnmatch(n, p) for p in include)}
    compressible = {
        n
        for n in chosen
        if n in params
        and params[n].is_floating_point()
        and params[n].numel() >= min_numel
        and not any(fnmatch(n, p) for p in exclude)
    }
    return [
        TensorSpec(name, t.shape, t.dtype, name in compressible)
        for name, t in model.state_dict().items()
        if name not in stay
    ]


def frozen_specs(model: nn.Module, plan: list[TensorSpec]) -> list[TensorSpec]:
    """The model's tensors that ``plan`` leaves out: they travel once, raw, in the full model
    a client first receives."""
    skip = {s.name for s in plan} | set(aliases(model))
    return [
        TensorSpec(name, t.shape, t.dtype, False)
        for name, t in model.state_dict().items()
        if name not in skip
    ]


def aliases(model: nn.Module) -> dict[str, str]:
    """Names in the model's state that are another name's tensor (tied weights: GPT-2's
    ``lm_head.weight`` is ``transformer.wte.weight``), to that first name. A tied tensor
    travels once, under its first name.

    >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    >>> net[1].weight = net[0].weight
    >>> aliases(net)
    {'1.weight': '0.weight'}
    """
    first: dict[int, str] = {}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        out_name = first.setdefault(id(t), name)
        if out_name != name:
            out[name] = out_name
    return out


def load_model(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state)`` where ``state`` names each tied tensor once.

    When ``state`` holds exactly the model's tensors, in their shapes, and no module changes
    how it loads, this is what ``load_state_dict`` does (``copy_`` each under ``no_grad``)
    without its per-module Python: a client of a cross-device round loads a model in a
    quarter of the time. Anything else takes ``load_state_dict`` and its errors.
    """
    targets = model.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    tied = {n: first.setdefault(id(t), n) for n, t in targets.items()}
    if (
        state.keys() == {n for n, f in tied.items() if n == f}
        and all(targets[n].shape == t.shape for n, t in state.items())
        and _loads_plainly(model, targets)
    ):
        with torch.no_grad():
            torch._foreach_copy_([targets[n] for n in state], list(state.values()))
        return
    fill = {n: state[f] for n, f in tied.items() if n != f and f in state and n not in state}
    model.load_state_dict(state | fill)


_PLAIN_LOADS = (
    nn.Module._load_from_state_dict,
    nn.modules.batchnorm._NormBase._load_from_state_dict,
)


def _loads_plainly(model: nn.Module, targets: dict[str, torch.Tensor]) -> bool:
    """torch's own ``load_state_dict`` on the root, no load hooks, and torch's own
    ``_load_from_state_dict`` on every module that owns tensors of the state (BatchNorm's
    differs only for checkpoints without ``num_batches_tracked``, which a full state has);
    a module owning none (a torchmetrics metric) loads nothing."""
    owners = {n.rpartition(".")[0] for n in targets}
    return type(model).load_state_dict is nn.Module.load_state_dict and all(
        not m._load_state_dict_pre_hooks
        and not m._load_state_dict_post_hooks
        and (type(m)._load_from_state_dict in _PLAIN_LOADS or name not in owners)
        for name, m in model.named_modules()
    )
