"""The compressor registry: names in configs -> compressor classes with default parameters."""

from __future__ import annotations

from fedbat.registry import ClassRegistry

COMPRESSORS = ClassRegistry("compressor", "compressor")
register = COMPRESSORS.register
