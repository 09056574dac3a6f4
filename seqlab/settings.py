"""Where seqlab finds its recipes, its bundled data and its cache: the one module that reads
seqlab's environment variables.

    SEQLAB_RECIPES   a folder of recipes to use instead of the ones seqlab ships
    SEQLAB_CACHE     cache root (default ~/.cache/seqlab); FASTA indexes of read-only folders
                     are built under <cache>/fai

Recipes (recipes/) and the bundled data (datasets/) ship inside the installed package: a wheel
puts them at site-packages/seqlab/recipes and .../datasets, an editable install leaves them in
the source checkout. :func:`resource_root` is whichever folder holds them, so paths such as
``datasets/bacteria/manifest.yaml`` in a recipe resolve from any working directory.
"""
from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resource_root() -> Path:
    """The folder holding recipes/ and datasets/: the installed package (a wheel), else the
    source checkout beside it (an editable install)."""
    if (_PACKAGE / "recipes").is_dir():
        return _PACKAGE
    return _PACKAGE.parent


def recipes_dir() -> Path:
    """SEQLAB_RECIPES when set, else the recipes seqlab ships."""
    env = os.environ.get("SEQLAB_RECIPES", "").strip()
    return Path(env).expanduser() if env else resource_root() / "recipes"


def datasets_dir() -> Path:
    """The bundled data sets (datasets/bacteria, datasets/speech)."""
    return resource_root() / "datasets"


def cache_dir() -> Path:
    """SEQLAB_CACHE when set, else ~/.cache/seqlab."""
    env = os.environ.get("SEQLAB_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "seqlab"


__all__ = ["resource_root", "recipes_dir", "datasets_dir", "cache_dir"]
