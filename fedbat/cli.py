"""The ``fedbat`` command: ``train`` (Hydra app), ``list`` (what is registered), ``plot`` and
``compare`` (runs read back)."""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

from fedbat import slurm
from fedbat.compose import prevalidate
from fedbat.errors import ConfigError, fail

USAGE = """usage: fedbat {train,flower,list,plot,compare} ...

  fedbat train [hydra overrides...]   run a federated job (configs/train.yaml), e.g.
        fedbat train data=fmnist model=cnn4 compressor=fedbat compressor.downlink=none
        fedbat train --cfg job          print the resolved config
        fedbat train --multirun compressor=none,fedbat,topk
  fedbat flower --supernodes N [overrides...]
                                      the same job on a local Flower deployment
                                      (SuperLink + N SuperNodes on 127.0.0.1)
  fedbat list                         every registry: compressors, strategies, wrappers, ...
  fedbat plot RUN_DIR... [-o OUT] [--x round,uplink,downlink,total,comm,time]
                                      [--format png,pdf,svg]
                                      accuracy curves, seeds as mean +- sd
  fedbat compare RUN_DIR... [--target ACC]
                                      a Markdown table of the runs
  fedbat fedscale-trace CAPACITY [BEHAVIOUR] --clients N -o DIR
                                      FedScale's device traces as system.trace and
                                      system.availability CSVs
"""

HYDRA_FLAGS = (
    "-m",
    "--multirun",
    "--cfg",
    "-c",
    "--help",
    "-h",
    "--hydra-help",
    "--info",
    "-i",
    "--resolve",
    "--package",
    "-p",
    "--run",
    "-r",
    "--shell-completion",
    "-sc",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
)


CHECKED_FLAGS = {"-m": 0, "--multirun": 0, "--cfg": 1, "-c": 1, "--resolve": 0}  # flag: values


def jobs_to_validate(args: list[str]) -> list[list[str]]:
    """The overrides of every job ``fedbat train args`` would run (one list; one per job of
    a ``--multirun``, expanded as Hydra's basic sweeper does), or none where other Hydra
    flags (help, completion, another config) make the command something else."""
    overrides, i = [], 0
    while i < len(args):
        if args[i] in CHECKED_FLAGS:
            i += 1 + CHECKED_FLAGS[args[i]]
            continue
        if args[i].split("=")[0] in HYDRA_FLAGS:
            return []
        overrides.append(args[i])
        i += 1
    if not any(a in ("-m", "--multirun") for a in args):
        return [overrides]
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return [overrides]  # composing it says what is wrong, in one line
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [o.input_line]
        for o in parsed
    ]
    return [list(job) for job in itertools.product(*choices)]


def train(args: list[str]) -> int:
    jobs = jobs_to_validate(args)
    for job in jobs:  # every job of a sweep, before Hydra starts any or writes a thing
        problem = prevalidate(job, check_run_dir=len(jobs) == 1 and "--cfg" not in args)
        if problem:
            return fail(problem)
    from fedbat import train as train_module

    # Hydra reads its overrides from sys.argv; the app puts the original command back before
    # training, since Lightning's DDP launcher re-runs it for the other processes.
    train_module.ORIGINAL_ARGV[:] = sys.argv
    sys.argv = [sys.argv[0], *args]
    try:
        train_module.hydra_main()
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (fedbat.lifecycle.Interrupted)
        from fedbat.lifecycle import Interrupted

        if not isinstance(stop, Interrupted):  # before the rounds started
            stop = Interrupted("SIGINT")
        print(f"fedbat: {stop.message()}", file=sys.stderr)
        return stop.exit_code
    except SystemExit as exit_:  # a ConfigError found once the data is loaded: code 2
        return int(exit_.code or 0)
    return 0


def shell_completion(argv: list[str]) -> int:
    """Hydra's shell completion (``eval "$(fedbat -sc install=bash)"``). Its script calls
    ``fedbat -sc query=bash`` with the command line in ``COMP_LINE``; Hydra completes the
    words after the program, so the ``train`` command is taken out of the line first."""
    import os

    line = os.environ.get("COMP_LINE", "")
    words = line.split(" ", 2)
    if len(words) > 1 and words[1] == "train":
        os.environ["COMP_LINE"] = " ".join([words[0], *words[2:]])
        point = int(os.environ.get("COMP_POINT", len(line)))
        os.environ["COMP_POINT"] = str(max(0, point - len(" train")))
    return train(argv)


def _compressor_line(name: str) -> str:
    """A compressor's parameters (defaults) and its most bits per coordinate on a 1024 x 1024
    matrix, from the bytes its encoder can produce."""
    import inspect

    from fedbat.compressors import COMPRESSORS

    entry = COMPRESSORS[name]
    params = inspect.signature(entry["cls"].__init__).parameters
    defaults = {k: p.default for k, p in params.items() if k != "self"} | entry["init_params"]
    shape = (1024, 1024)
    bits = 8 * COMPRESSORS.get(name).max_payload_bytes(shape) / math.prod(shape)
    shown = ", ".join(f"{k}={v}" for k, v in defaults.items()) or "no parameters"
    return f"{name}: {bits:.3g} bits/coord; {shown}"


def list_registered() -> int:
    from rich.console import Console
    from rich.table import Table

    from fedbat.compressors import COMPRESSORS
    from fedbat.datamodules import PARTITIONERS, READERS
    from fedbat.models import MODELS
    from fedbat.strategies import STRATEGIES, WRAPPERS

    table = Table("kind", "names")
    described = (("compressors", COMPRESSORS), ("strategies", STRATEGIES),
                 ("strategy.wrap", WRAPPERS))  # fmt: skip
    for kind, registry in described:
        table.add_row(kind, "\n".join(f"{n}: {d}" for n, d in registry.describe().items()))
    table.add_row("compressor bits", "\n".join(map(_compressor_line, COMPRESSORS.available())))
    table.add_row("datasets", ", ".join(READERS))
    table.add_row("models", ", ".join(MODELS))
    table.add_row("partitions", ", ".join(PARTITIONERS))
    Console().print(table)
    return 0


def plot(args: list[str]) -> int:
    from fedbat.plot import plot_runs

    parser = argparse.ArgumentParser(prog="fedbat plot")
    parser.add_argument("runs", nargs="+", type=Path, help="run dirs or sweep dirs")
    parser.add_argument("-o", "--out", type=Path, default=None, help="output folder")
    parser.add_argument(
        "--x",
        default="round,uplink",
        help="x axes: round, uplink, downlink, total (bits), comm, time (virtual seconds)",
    )
    parser.add_argument("--format", default="png", help="png, pdf, svg (comma-separated)")
    parser.add_argument("--title", default=None, help="default: dataset | model | partition")
    ns = parser.parse_args(args)
    try:
        paths = plot_runs(
            ns.runs, ns.out, ns.x.split(","), ns.format.split(","), title_text=ns.title
        )
    except ConfigError as err:
        return fail(str(err))
    for p in paths:
        print(p)
    return 0


def compare(args: list[str]) -> int:
    from fedbat.plot import compare as compare_runs

    parser = argparse.ArgumentParser(prog="fedbat compare")
    parser.add_argument("runs", nargs="+", type=Path, help="run dirs or sweep dirs")
    parser.add_argument(
        "--target", type=float, default=None, help="accuracy for the bits-to-target column"
    )
    ns = parser.parse_args(args)
    try:
        print(compare_runs(ns.runs, ns.target), end="")
    except ConfigError as err:
        return fail(str(err))
    return 0


def fedscale_trace(args: list[str]) -> int:
    from fedbat.traces import convert_fedscale

    parser = argparse.ArgumentParser(
        prog="fedbat fedscale-trace",
        description="FedScale's device traces (pickles, read as data only) as the CSVs of "
        "system.trace and system.availability",
    )
    parser.add_argument("capacity", type=Path, help="client_device_capacity")
    parser.add_argument("behaviour", type=Path, nargs="?", help="client_behave_trace")
    parser.add_argument("--clients", type=int, required=True, help="data.num_clients")
    parser.add_argument(
        "--horizon-s", type=float, default=7 * 86400.0, help="availability to unroll (s)"
    )
    parser.add_argument("-o", "--out", type=Path, required=True, help="folder for the CSVs")
    ns = parser.parse_args(args)
    if ns.clients < 1 or not (math.isfinite(ns.horizon_s) and ns.horizon_s > 0):
        return fail(f"--clients={ns.clients}, --horizon-s={ns.horizon_s}: must be >= 1 and > 0")
    try:
        written = convert_fedscale(ns.capacity, ns.behaviour, ns.clients, ns.horizon_s, ns.out)
    except ConfigError as err:
        return fail(str(err))
    for path in filter(None, written):
        print(path)
    return 0


def flower(args: list[str]) -> int:
    try:
        from fedbat.integrations.flower import deploy
    except ImportError:  # pragma: no cover  (the extra is part of dev)
        return fail('flower: Flower is not installed; pip install "fedbat[flower]"')
    return deploy.main(args)


def main(argv: list[str] | None = None) -> int:
    slurm.listen()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-V", "--version"):
        from fedbat import __version__

        print(f"fedbat {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-sc", "--shell-completion"):
        return shell_completion(argv)
    commands = {
        "train": train,
        "flower": flower,
        "list": lambda _: list_registered(),
        "plot": plot,
        "compare": compare,
        "fedscale-trace": fedscale_trace,
    }
    if argv[0] not in commands:
        return fail(f"unknown command {argv[0]!r}; available: {', '.join(commands)}")
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
