"""What a deployment across machines needs, written on one machine by ``fedbat flower
--write-credentials / --write-node-data / --write-app`` (README, "Across machines"): the
TLS certificates and SuperNode keys, each node's data folder (to rehearse with a public
dataset; a real node brings its own), and the Flower app with the ``flwr`` connection that
submits it. Nothing here starts a process; nothing already written is overwritten.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import DictConfig

from fedbat.errors import ConfigError
from fedbat.integrations.flower.app import flwr_config, write_app
from fedbat.integrations.flower.node_data import write_folders
from fedbat.integrations.flower.security import Credentials, generate

CONNECTION = "fedbat"  # the name of the SuperLink in flwr's config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--write-credentials",
        type=Path,
        metavar="DIR",
        help="write a CA, the SuperLink's certificate (for each --host) and a key pair per "
        "SuperNode in DIR, and exit",
    )
    parser.add_argument(
        "--host",
        action="append",
        help="an address or DNS name the SuperLink's certificate is valid for (repeatable; "
        "default 127.0.0.1)",
    )
    parser.add_argument(
        "--write-node-data",
        type=Path,
        metavar="DIR",
        help="write the job's data as its nodes and server would hold it (DIR/node-<i>, "
        "DIR/server, data.name=tensors) and exit",
    )
    parser.add_argument(
        "--write-app",
        type=Path,
        metavar="DIR",
        help="write the Flower app of this job for nodes that hold their own data "
        "(DIR/app) and flwr's connection to --superlink (DIR/flwr/config.toml), and exit",
    )
    parser.add_argument(
        "--superlink",
        default="127.0.0.1:9092",
        metavar="HOST:PORT",
        help="where flwr reaches the SuperLink (with --write-app; default 127.0.0.1:9092)",
    )


def wanted(ns: argparse.Namespace) -> bool:
    return any((ns.write_credentials, ns.write_node_data, ns.write_app))


def write(ns: argparse.Namespace, cfg: DictConfig) -> list[str]:
    """Write what ``ns`` asks for; one line per thing written."""
    done = []
    if ns.write_credentials:
        if ns.write_credentials.exists() and any(ns.write_credentials.iterdir()):
            raise ConfigError(f"--write-credentials={ns.write_credentials}: not empty")
        generate(ns.write_credentials, ns.supernodes, tuple(ns.host or ["127.0.0.1"]))
        done.append(f"credentials for {ns.supernodes} SuperNodes in {ns.write_credentials}")
    if ns.write_node_data:
        n = len(write_folders(cfg, ns.write_node_data)) - 1
        done.append(f"the data of {n} nodes and the server in {ns.write_node_data}")
    if ns.write_app:
        done.append(app(ns, cfg))
    return done


def app(ns: argparse.Namespace, cfg: DictConfig) -> str:
    """The app and flwr's home in ``ns.write_app``, trusting the CA of the credentials
    written or named (``--credentials``)."""
    where, creds = ns.write_app, ns.write_credentials or ns.credentials
    if creds is None or Credentials(creds).missing(0):
        raise ConfigError(
            "--write-app: name the credentials whose CA flwr trusts (--credentials DIR, "
            "or --write-credentials DIR in the same command)"
        )
    if where.exists() and any(where.iterdir()):
        raise ConfigError(f"--write-app={where}: not empty")
    write_app(cfg, where, ns.round_timeout, launcher=False, node_data=True)
    home = where / "flwr"
    home.mkdir()
    ca = Credentials(creds.resolve()).ca
    (home / "config.toml").write_text(flwr_config(CONNECTION, ns.superlink, ca))
    return f"the app in {where / 'app'} and flwr's connection '{CONNECTION}' in {home}"
