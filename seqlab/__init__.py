"""seqlab: Mamba models for genomes and raw audio, as byte sequences.

Top-level conveniences are imported lazily so that ``import seqlab`` stays cheap:
``seqlab.load_pretrained(directory)`` loads a seqlab, mamba_ssm, Hugging Face or Caduceus
checkpoint directory into a seqlab model (see seqlab.checkpoint).
"""
__version__ = "0.1.0"

__all__ = ["load_pretrained", "__version__"]


def __getattr__(name):
    if name == "load_pretrained":
        from .checkpoint import load_pretrained
        return load_pretrained
    raise AttributeError(f"module 'seqlab' has no attribute {name!r}")
