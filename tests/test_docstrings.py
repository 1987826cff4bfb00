"""The docstring examples of fedbat.compressors and fedbat.datamodules (their folders sit
beside fedbat/ in the repository, so pytest's own doctest collection would import them
under a second, top-level name)."""

import doctest
import importlib
import pkgutil

import pytest

import fedbat.compressors
import fedbat.datamodules

MODULES = sorted(
    name
    for pkg in (fedbat.compressors, fedbat.datamodules)
    for name in [pkg.__name__]
    + [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_every_package_has_examples():
    assert sum(doctest.testmod(importlib.import_module(n)).attempted for n in MODULES) >= 10
