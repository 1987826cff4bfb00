"""fedbat: communication-efficient federated learning on Lightning Fabric.

``fedbat.fit(module, datamodule, overrides=[...])`` trains your own LightningModule; the
``fedbat`` command runs configured jobs (``fedbat train``).
"""

from typing import Any

__version__ = "0.1.0"

# The repository keeps compressors/, datamodules/ and configs/ beside fedbat/; installed
# (``pip install -e .`` included: setup.cfg's package_dir) they are the subpackages
# fedbat.compressors, fedbat.datamodules and fedbat.configs, so a user's own top-level
# ``configs`` or ``compressors`` never shadows them.
__all__ = ["__version__", "fit"]


def __getattr__(name: str) -> Any:  # ``fit`` imports Lightning: only when it is used
    if name == "fit":
        from fedbat.api import fit

        return fit
    raise AttributeError(f"module 'fedbat' has no attribute {name!r}")
