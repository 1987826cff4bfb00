"""What a run reports: the monitored metric's final and best values, the bits spent, and
the line a run ends with when its monitor was never logged."""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig

LOWER_IS_BETTER = ("loss", "error", "err", "ppl", "perplexity", "mse", "mae", "rmse")


def monitor_lower(key: str, mode: str) -> bool:
    """Whether lower values of ``key`` are better: ``monitor_mode``, or with ``auto`` a key
    naming a loss, error or perplexity (``val_loss``, ``test/ppl``).

    >>> monitor_lower("test/acc", "auto"), monitor_lower("val_loss", "auto")
    (False, True)
    """
    if mode != "auto":
        return mode == "min"
    words = re.split(r"[^a-z]+", key.lower())
    return any(w in LOWER_IS_BETTER for w in words)


def unlogged_monitor(history: list[dict[str, float]], key: str) -> str:
    """The line a run ends with when its ``monitor`` was never logged.

    >>> unlogged_monitor([{"round": 1, "bits/uplink": 8, "val_acc": 0.9}], "test/acc")
    "fedbat: monitor='test/acc' was never logged, ...; logged: val_acc (set monitor=<one of them>)"
    """
    accounting = ("bits/", "time/", "compression/", "clients/", "sim/", "fedbat/", "flower/")
    logged = sorted({k for h in history for k in h if not k.startswith(accounting)} - {"round"})
    return (
        f"fedbat: monitor={key!r} was never logged, so the summary has no final or best "
        f"value; logged: {', '.join(logged) or 'nothing'} (set monitor=<one of them>)"
    )


def summarise(
    history: list[dict[str, float]], cfg: DictConfig, monitor: str | None = None
) -> dict[str, Any]:
    """Best/final value of the monitored metric (``monitor``, as resolved from ``auto``;
    best is the max, or the min with ``monitor_mode=min``, and ``auto`` is min for a loss,
    error or perplexity), total bits, and the uplink bits, all bits and virtual time
    (``sim/clock_s``) at which it first reached ``target_acc`` (None when it never did)."""
    key = monitor or cfg.get("monitor", "auto")
    key = "test/acc" if key == "auto" else key  # nothing was evaluated
    lower = monitor_lower(key, cfg.get("monitor_mode", "auto"))
    evals = [h for h in history if key in h]
    target = cfg.get("target_acc")

    def reached(value: float) -> bool:
        return value <= target if lower else value >= target

    hit = next((h for h in evals if target is not None and reached(h[key])), None)
    last = history[-1] if history else {}
    best = (min if lower else max)((h[key] for h in evals), default=None)
    return {
        "rounds": len(history),
        "monitor": key,
        "final_acc": evals[-1][key] if evals else None,
        "best_acc": best,
        "bits_uplink_total": last.get("bits/uplink_cum", 0),
        "bits_downlink_total": last.get("bits/downlink_cum", 0),
        "target_acc": target,
        "bits_uplink_to_target": hit["bits/uplink_cum"] if hit else None,
        "bits_to_target": hit["bits/uplink_cum"] + hit["bits/downlink_cum"] if hit else None,
        "time_to_target_s": hit.get("sim/clock_s") if hit else None,  # None without a clock
        "privacy_epsilon": last.get("privacy/epsilon"),  # None without privacy=dp
    }
