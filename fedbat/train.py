"""The Hydra application behind ``fedbat train``.

It is also runnable as a script (``python -m fedbat.train`` or by path) because Lightning's
DDP launcher re-executes the current script for every extra process.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from fedbat.errors import ConfigError

CONFIG_PATH = "pkg://configs"


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    from fedbat.loop import run

    if cfg.run_dir is None:
        with open_dict(cfg):
            cfg.run_dir = HydraConfig.get().runtime.output_dir
    try:
        summary = run(cfg)
    except ConfigError as err:
        print(f"fedbat: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return summary.get("final_acc")  # the sweep objective


if __name__ == "__main__":
    hydra_main()
