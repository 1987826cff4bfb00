"""The Hydra application behind ``fedbat train``.

It is also runnable as a script (``python -m fedbat.train`` or by path) because Lightning's
DDP launcher re-executes the current script for every extra process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from fedbat.errors import ConfigError, PeerLost

CONFIG_PATH = "pkg://fedbat.configs"
ORIGINAL_ARGV: list[str] = []  # the command as typed (``fedbat train ...``), set by the CLI


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    from fedbat.loop import run

    name_runs(cfg)
    if ORIGINAL_ARGV:
        sys.argv[:] = ORIGINAL_ARGV
    try:
        summary = run(cfg)
    except (ConfigError, PeerLost) as err:
        print(f"fedbat: error: {err}", file=sys.stderr)
        raise SystemExit(2 if isinstance(err, ConfigError) else 1) from None
    return summary.get("final_acc")  # the sweep objective


def name_runs(cfg: DictConfig) -> None:
    """Fill what Hydra knows and the config left open: the run dir, the W&B run name (the
    command's overrides) and, in a sweep, one W&B group for all of its runs."""
    hc = HydraConfig.get()
    with open_dict(cfg):
        if cfg.run_dir is None:
            cfg.run_dir = hc.runtime.output_dir
        w = cfg.logger.get("wandb")
        if w is not None:
            if w.get("group") is None and hc.mode == RunMode.MULTIRUN:
                w.group = f"sweep-{Path(hc.sweep.dir).name}"
            if w.get("name") is None:
                w.name = hc.job.override_dirname or cfg.compressor.name


if __name__ == "__main__":
    hydra_main()
