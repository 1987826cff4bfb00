"""Imported first by every benchmark script: run as ``python benchmarks/X.py``, this folder
is on sys.path and ``benchmarks/compressors.py`` would shadow the ``compressors`` package."""

import sys
from pathlib import Path

HERE = Path(__file__).parent.resolve()
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
