"""The Flower app a deployment submits: only its ``pyproject.toml``, since the code is the
installed fedbat on every machine (``fedbat[flower]``), with the job and how to run it as
run-config values."""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

APP_TOML = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedbat-flower"
version = "{version}"
description = "fedbat on Flower: compressed federated learning"
license = "MIT"
dependencies = []  # fedbat[flower] is installed on every node

[tool.flwr.app]
publisher = "fedbat"

[tool.flwr.app.components]
serverapp = "fedbat.integrations.flower.server_app:app"
clientapp = "fedbat.integrations.flower.client_app:app"

[tool.flwr.app.config]
round-timeout = {timeout}
launcher = {launcher}
clients-persist = {persist}
node-data = {node_data}
error-file = {error_file}
config = {config}
"""


ERROR_FILE = "server-error.txt"


def write_app(
    cfg: DictConfig,
    where: Path,
    timeout: float,
    launcher: bool = True,
    persist: bool = False,
    node_data: bool = False,
) -> Path:
    """The Flower app to submit, ``where/app``: only its pyproject.toml (the code is the
    installed fedbat), with the job's resolved config and, as run-config values: this
    launcher's pid, which holds the run dir, and the file the ServerApp reports an error in
    (with ``launcher``: else the ServerApp holds the run dir itself and reports in its
    log); whether the nodes kept their state from the run this one resumes (``persist``);
    and whether they hold their own data (``node_data``)."""
    from fedbat import __version__

    app = where / "app"
    app.mkdir(parents=True)
    config = json.dumps(OmegaConf.to_yaml(cfg, resolve=True))  # a valid TOML basic string
    (app / "pyproject.toml").write_text(
        APP_TOML.format(
            version=__version__,
            timeout=timeout,
            launcher=os.getpid() if launcher else 0,
            persist=str(persist).lower(),
            node_data=str(node_data).lower(),
            error_file=json.dumps(str(where / ERROR_FILE) if launcher else ""),
            config=config,
        )
    )
    return app


def flwr_config(name: str, address: str, ca: Path) -> str:
    """``flwr``'s ``config.toml`` (in ``FLWR_HOME``): the connection ``name`` to the
    SuperLink at ``address``, whose certificate it verifies against ``ca``."""
    return (
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
        f"address = {json.dumps(address)}\nroot-certificates = {json.dumps(str(ca))}\n"
    )
