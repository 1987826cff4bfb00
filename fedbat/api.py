"""``fedbat.fit``: federated training of your own LightningModule from Python.

The same config keys as the command line (``compressor=fedbat``, ``fed.rounds=5``,
``trainer.devices=2``, ...), the same run dir (metrics.csv, checkpoint.pt, summary.json,
W&B), the same resume. With ``trainer.devices > 1`` Fabric re-runs your script for the other
processes, as Lightning does: call ``fit`` from a script, under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, open_dict
from torch.utils.data import Dataset

from fedbat.assembly import split_args
from fedbat.compose import compose, hydra_message
from fedbat.config import run_name, validate
from fedbat.datamodules.dataset import DatasetClients, from_datamodule
from fedbat.errors import ConfigError
from fedbat.lifecycle import run


def fit(
    module: L.LightningModule,
    datamodule: L.LightningDataModule | None = None,
    *,
    train_dataset: Dataset | None = None,
    test_dataset: Dataset | None = None,
    val_dataset: Dataset | None = None,
    overrides: Sequence[str] | None = (),
    label_fn: Callable[[Any], int] | None = None,
    client_key: Callable[[Any], Hashable] | None = None,
) -> dict[str, Any]:
    """Train ``module`` federatedly on ``datamodule`` (or a ``train_dataset`` with a
    ``test_dataset`` and/or ``val_dataset``) and return the run summary. The server runs
    ``validation_step`` on the validation data and ``test_step`` on the test data every
    ``fed.eval_every`` rounds.

    The training set is split over ``data.num_clients`` clients by ``data.partition`` (labels
    from the dataset's ``targets`` or ``label_fn``), or one client per ``client_key(sample)``.
    The run dir is ``run_dir=...`` when given, else ``runs/<ModuleClass>/<overrides>``.
    """
    if not isinstance(module, L.LightningModule):
        raise ConfigError(f"fit: module is a {type(module).__name__}; it must be a LightningModule")
    if (datamodule is None) == (train_dataset is None):
        raise ConfigError("fit: pass either a datamodule or a train_dataset")
    if datamodule is not None and (test_dataset is not None or val_dataset is not None):
        raise ConfigError(
            "fit: a datamodule brings its own val/test data; pass datasets without one"
        )
    cfg = _compose(overrides)
    with open_dict(cfg):
        if cfg.run_dir is None:
            cfg.run_dir = str(default_run_dir(type(module).__name__, overrides or []))
    validate(cfg)
    split = split_args(cfg)  # the data.* keys; functions given here take precedence
    split |= {k: f for k, f in (("label_fn", label_fn), ("client_key", client_key)) if f}
    if datamodule is not None:
        data = from_datamodule(datamodule, **split)
    else:
        data = DatasetClients(train_dataset, test_dataset, val=val_dataset, **split)  # type: ignore[arg-type]
    with open_dict(cfg):  # a natural partition decides the number of clients
        cfg.data.num_clients = data.num_clients
    return run(cfg, task=module, data=data)


def _compose(overrides: Sequence[str] | None) -> DictConfig:
    """The config of ``overrides``, with Hydra's errors in fedbat's one-line form."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if overrides is None:
        overrides = []
    if isinstance(overrides, str | bytes) or not isinstance(overrides, Sequence):
        raise ConfigError(
            f"fit: overrides={overrides!r}: must be a list of 'key=value' strings, "
            'e.g. overrides=["compressor=fedbat", "fed.rounds=5"]'
        )
    if bad := [o for o in overrides if not isinstance(o, str)]:
        raise ConfigError(f"fit: overrides: {bad[0]!r} is not a 'key=value' string")
    try:
        return compose(list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(hydra_message(str(err), list(overrides))) from None


def default_run_dir(name: str, overrides: Sequence[str]) -> Path:
    """``runs/<name>/<overrides joined as Hydra names its run dirs>``."""
    return Path("runs") / name / re.sub(r"[^\w.=,+-]", "_", run_name(overrides))
