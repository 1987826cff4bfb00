"""Composing a run's config from ``key=value`` overrides, as ``fedbat train`` would, without
starting a run; and Hydra's errors turned into fedbat's one-line form. The CLI, ``fedbat.fit``
and ``fedbat flower`` compose here."""

from __future__ import annotations

import re
from pathlib import Path

from fedbat.errors import ConfigError, RunDirError


def compose(overrides: list[str], with_hydra: bool = False):
    """The config ``fedbat train overrides`` would run, composed without starting a run
    (``with_hydra``: with Hydra's own node, where the run dir is)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("fedbat.configs", version_base="1.3"):
        return hydra_compose("train", overrides=overrides, return_hydra_config=with_hydra)


def prevalidate(overrides: list[str], check_run_dir: bool = True) -> str | None:
    """Compose and validate before Hydra creates or touches any run directory."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fedbat.config import validate

    try:
        cfg = compose(overrides, with_hydra=True)
        run_dir = Path(cfg.run_dir or cfg.hydra.run.dir)
        if check_run_dir and run_dir.exists() and not run_dir.is_dir():  # Hydra would fail
            raise RunDirError(f"run_dir={run_dir}: exists and is not a directory")
        validate(cfg)
    except ConfigError as err:
        return str(err)
    except (HydraException, OmegaConfBaseException) as err:
        return hydra_message(str(err), overrides)
    return None


def hydra_message(text: str, overrides: list[str]) -> str:
    r"""Hydra's composition errors in fedbat's ``key=value: what is allowed`` form.

    >>> text = "In 'train': Could not find 'logger/slack'\n\nAvailable options in 'logger':"
    >>> hydra_message(text + "\n\tcsv\n\twandb\nConfig search path: ...", ["logger=slack"])
    'logger=slack: unknown logger option; available: csv, wandb'
    """
    missing = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], re.M)
        listed = f"; available: {', '.join(options)}" if options else ""
        return f"{group}={option}: unknown {group} option{listed}"
    unknown = re.search(r"Could not override '([^']+)'", text)
    if unknown:
        key = unknown.group(1)
        given = next((o for o in overrides if o.split("=")[0] == key), key)
        parent, _, _ = key.rpartition(".")
        from omegaconf import DictConfig, OmegaConf

        node = OmegaConf.select(compose([]), parent) if parent else compose([])
        ok = isinstance(node, DictConfig)
        keys = f"; {parent or 'the config'} has: {', '.join(map(str, node))}" if ok else ""
        return f"{given}: no such key{keys}"
    return " ".join(text.split("Config search path")[0].split())
