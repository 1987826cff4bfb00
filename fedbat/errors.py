"""Errors the CLI turns into one clear line and exit code 2 (bad input, not a bug)."""


class ConfigError(ValueError):
    """A configuration value is invalid: the message names the key, the value and what is
    allowed."""


class DataNotFoundError(ConfigError):
    """A dataset's files are missing: the message says where we looked and how to get them."""


class PacketError(ValueError):
    """A packet from the wire is malformed or unsafe to apply; the server rejects it."""
