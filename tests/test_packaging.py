"""The installed package is the repository: every package folder is in setup.cfg, so a
wheel (not only an editable install) holds all of fedbat."""

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    mapped = {
        line.split("=")[1].strip(): line.split("=")[0].strip()
        for line in cfg["options"]["package_dir"].strip().splitlines()
    }
    found = set()
    for init in ROOT.glob("**/__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts[0] in ("tests", "build", "benchmarks", "examples") or "." in str(rel)[:1]:
            continue
        top = mapped.get(rel.parts[0], rel.parts[0])
        found.add(".".join([top, *rel.parts[1:]]))
    assert found == listed, (found - listed, listed - found)
