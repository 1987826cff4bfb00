"""Round progress on the terminal: a rich bar when interactive, plain lines otherwise
(CI logs and pipes stay readable)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn


def human_bits(bits: float) -> str:
    """Bits with a binary-free SI prefix.

    >>> human_bits(12_539_136)
    '12.54 Mb'
    """
    for unit, scale in (("Gb", 1e9), ("Mb", 1e6), ("kb", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.2f} {unit}"
    return f"{bits:.0f} b"


NARROW = 110  # columns below which the bar shows accuracy and uplink bits only


class RoundProgress:
    """``update`` once per round with that round's metrics."""

    def __init__(
        self,
        total: int,
        start: int = 0,
        stream: TextIO | None = None,
        enabled: bool = True,
        console: Console | None = None,
    ) -> None:
        self.total, self.done, self.enabled = total, start, enabled
        self.stream = stream or sys.stdout
        self.console = console or Console(file=self.stream)
        self.started = time.perf_counter()
        self.start_round = start
        self.bar: Progress | None = None
        if enabled and self.console.is_terminal:
            self.bar = Progress(
                TextColumn("round {task.completed}/{task.total}"),
                BarColumn(bar_width=20),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.bar.add_task("rounds", total=total, completed=start, info="")
            self.bar.start()

    def update(self, metrics: dict[str, float], monitor: str = "test/acc") -> None:
        self.done += 1
        if not self.enabled:
            return
        per_round = (time.perf_counter() - self.started) / (self.done - self.start_round)
        eta = per_round * (self.total - self.done)
        acc = metrics.get(monitor)
        label = "acc" if monitor == "test/acc" else monitor
        shown = f"{label} {acc:.4f} | " if acc is not None else ""
        if self.bar is not None and self.console.width < NARROW:  # keep the bar and the ETA
            short = shown + (f"up {human_bits(metrics['bits/uplink_cum'])}")
            self.bar.update(self.task, completed=self.done, info=short)
            return
        info = shown + (
            f"loss {metrics.get('train/loss', float('nan')):.4f} | "
            f"up {human_bits(metrics['bits/uplink_cum'])} | "
            f"down {human_bits(metrics['bits/downlink_cum'])} | "
            f"{metrics['time/round_s']:.2f} s/round"
        )
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, info=info)
        else:
            print(
                f"round {self.done}/{self.total} | {info} | eta {eta:.0f} s",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
