"""fedbat: communication-efficient federated learning on Lightning Fabric.

``fedbat.fit(module, datamodule, overrides=[...])`` trains your own LightningModule; the
``fedbat`` command runs configured jobs (``fedbat train``).
"""

from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# The repository keeps compressors/, datamodules/ and configs/ beside fedbat/; they are the
# subpackages fedbat.compressors, fedbat.datamodules and fedbat.configs (a wheel puts them
# inside fedbat/), so a user's own top-level ``configs`` or ``compressors`` never shadows them.
_SIBLINGS = Path(__file__).resolve().parent.parent
if (_SIBLINGS / "compressors" / "__init__.py").is_file() and (_SIBLINGS / "fedbat").is_dir():
    __path__.append(str(_SIBLINGS))
__all__ = ["__version__", "fit"]


def __getattr__(name: str) -> Any:  # ``fit`` imports Lightning: only when it is used
    if name == "fit":
        from fedbat.api import fit

        return fit
    raise AttributeError(f"module 'fedbat' has no attribute {name!r}")
