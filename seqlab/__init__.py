"""seqlab: Mamba models for genomes and raw audio, as byte sequences.

Layers, each importing only the ones below it::

    cli -> jobs -> tasks -> training -> model -> kernels
    data: beside kernels at the bottom (files, windows, manifests, codes); tasks read it
    errors, progress, utils, version: base modules every layer may use

Top-level conveniences are imported lazily so that ``import seqlab`` stays cheap:
``seqlab.load_pretrained(path)`` loads a run directory, a checkpoint folder, or a mamba_ssm,
Hugging Face or Caduceus checkpoint into a seqlab model (seqlab.training.pretrained).
"""
from .version import __version__

__all__ = ["load_pretrained", "__version__"]


def __getattr__(name):
    if name == "load_pretrained":
        from .training.pretrained import load_pretrained
        return load_pretrained
    raise AttributeError(f"module 'seqlab' has no attribute {name!r}")
