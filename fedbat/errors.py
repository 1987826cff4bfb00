"""Errors the CLI turns into one clear line (exit code 2 for bad input, 1 for a lost peer
process) instead of a traceback, and the range check that raises them."""

import math
import sys


class ConfigError(ValueError):
    """A configuration value is invalid: the message names the key, the value and what is
    allowed."""


class DataNotFoundError(ConfigError):
    """A dataset's files are missing: the message says where we looked and how to get them."""


class PeerLost(RuntimeError):
    """Another process of the job stopped (crashed, killed) during a collective; that
    process's own output says why."""


class RunDirError(ConfigError):
    """The run directory cannot be used: not a directory, not writable, or held by another
    run."""


class CheckpointError(ConfigError):
    """A checkpoint file cannot be resumed from: damaged, or not a fedbat checkpoint."""


class PacketError(ValueError):
    """A packet from the wire is malformed or unsafe to apply; the server rejects it."""


def check_range(
    key: str, value: float, low: float, high: float, low_open: bool = False, integer: bool = False
) -> None:
    """Raise ConfigError unless ``low <(=) value <= high`` (and an integer when asked)."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or math.isnan(value):
        raise ConfigError(
            f"{key}={value!r}: must be {kind} in {'(' if low_open else '['}{low}, {high}]"
        )
    if value < low or (low_open and value == low) or value > high:
        raise ConfigError(f"{key}={value!r}: must be in {'(' if low_open else '['}{low}, {high}]")


def fail(message: str) -> int:
    """Print ``fedbat: error: message`` to stderr; the exit code of bad input."""
    print(f"fedbat: error: {message}", file=sys.stderr)
    return 2
