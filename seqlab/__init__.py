"""seqlab: Mamba models for genomes and raw audio, as byte sequences."""
__version__ = "0.1.0"
