"""seqlab's version, from the installed distribution's metadata: pyproject.toml is the one
place it is written. Imports nothing else from seqlab, so any layer may read it."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("seqlab")
except PackageNotFoundError:  # a source tree on sys.path without `pip install -e .`
    __version__ = "0+unknown"

__all__ = ["__version__"]
