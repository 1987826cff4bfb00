"""docs/architecture.md's extension points are true: every file and folder its table names
exists, and every registry's entries are the config files a user selects them by."""

import re
from pathlib import Path

import pytest

from fedbat.compressors import COMPRESSORS
from fedbat.datamodules import READERS
from fedbat.models import MODELS
from fedbat.strategies import STRATEGIES

ROOT = Path(__file__).parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text()
SECTION = DOC.split("## Extension points", 1)[1].split("\n## ", 1)[0]
TABLE = [line for line in SECTION.splitlines() if line.startswith("| ")][1:]


def test_the_table_has_every_extension_point():
    kinds = [row.split("|")[1].strip() for row in TABLE]
    assert kinds == ["compressor", "strategy", "strategy wrapper", "client hook", "transport",
                     "dataset", "task"]  # fmt: skip


def test_every_named_file_exists():
    named = {p.split(":")[0] for row in TABLE for p in re.findall(r"`([\w./<>-]+)`", row)}
    paths = [p for p in named if "/" in p and "<" not in p]
    assert len(paths) >= 8, paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, missing


@pytest.mark.parametrize(
    "registry,folder",
    [(COMPRESSORS, "compressor"), (STRATEGIES, "strategy"), (MODELS, "model"), (READERS, "data")],
)
def test_every_registered_entry_has_its_config_file(registry, folder):
    files = {p.stem for p in (ROOT / "configs" / folder).glob("*.yaml")}
    assert set(registry) == files
