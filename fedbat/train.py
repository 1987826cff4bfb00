"""The Hydra application behind ``fedbat train``.

It is also runnable as a script (``python -m fedbat.train`` or by path) because Lightning's
DDP launcher re-executes the current script for every extra process.
"""

from __future__ import annotations

import os
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
    from fedbat.lifecycle import run

    name_runs(cfg)
    if ORIGINAL_ARGV:
        sys.argv[:] = ORIGINAL_ARGV
    try:
        summary = run(cfg)
    except (ConfigError, PeerLost) as err:
        print(f"fedbat: error: {err}", file=sys.stderr)
        raise SystemExit(2 if isinstance(err, ConfigError) else 1) from None
    rank = next((os.environ[k] for k in ("RANK", "SLURM_PROCID") if k in os.environ), "0")
    if int(rank) == 0:  # torchrun / Fabric's launcher set RANK; srun sets SLURM_PROCID
        print(done_line(summary, cfg.run_dir))
    return summary.get("final_acc")  # the sweep objective


def done_line(summary: dict, run_dir: str) -> str:
    """The one line a finished run ends with.

    >>> done_line({"monitor": "test/acc", "final_acc": 0.9, "best_acc": 0.95,
    ...            "bits_uplink_total": 2e6, "bits_downlink_total": 3e6}, "runs/x")
    'fedbat: done: test/acc final 0.9000, best 0.9500 | up 2.00 Mb, down 3.00 Mb | runs/x'
    """
    from fedbat.progress import human_bits

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    return (
        f"fedbat: done: {summary.get('monitor', 'test/acc')} final {fmt(summary['final_acc'])}, "
        f"best {fmt(summary['best_acc'])} | up {human_bits(summary['bits_uplink_total'])}, "
        f"down {human_bits(summary['bits_downlink_total'])} | {run_dir}"
    )


def name_runs(cfg: DictConfig) -> None:
    """Fill what Hydra knows and the config left open: the run dir, the W&B run name (the
    command's overrides) and, in a sweep, the W&B group: the run's overrides without its
    seed, so that W&B's grouped view averages seeds of one configuration and never two
    compressors; the sweep's name goes into the tags."""
    hc = HydraConfig.get()
    with open_dict(cfg):
        if cfg.run_dir is None:
            cfg.run_dir = hc.runtime.output_dir
        w = cfg.logger.get("wandb")
        if w is not None:
            if hc.mode == RunMode.MULTIRUN:
                if w.get("group") is None:
                    w.group = sweep_group(list(hc.overrides.task), cfg.compressor.name)
                w.tags = [*(w.get("tags") or []), f"sweep-{Path(hc.sweep.dir).name}"]
            if w.get("name") is None:
                w.name = hc.job.override_dirname or cfg.compressor.name


def sweep_group(overrides: list[str], compressor: str) -> str:
    """The W&B group of a sweep's run: its overrides minus the seed (and settings that do
    not change results).

    >>> sweep_group(["compressor=fedbat", "seed=3", "fed.lr=0.1"], "fedbat")
    'compressor=fedbat,fed.lr=0.1'
    """
    from fedbat.config import RESULT_FREE, is_free

    kept = sorted(o for o in overrides if not is_free(o, (*RESULT_FREE, "seed")))
    return ",".join(kept) or compressor


if __name__ == "__main__":
    hydra_main()
