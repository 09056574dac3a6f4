"""Mamba model layer: mixers, blocks, backbone, heads, decoding, reverse-complement equivariance.

Modules, each importing only those listed before it (and seqlab.kernels / seqlab.utils):
config, rc, fused_mixer, mixer, bidirectional, norm, block, multiscale, decode, backbone, heads.
"""
from .backbone import Backbone, MambaLM, init_weights, param_groups
from .bidirectional import BiMixer
from .block import Block
from .config import MambaConfig
from .heads import ClassifierHead, MaskedLM, SequenceClassifier, mask_tokens, pool
from .mixer import Mixer
from .norm import RMSNorm
from .rc import (RCEmbedding, RCLMHead, RCWrapper, complement_table, conjoin_rc,
                 reverse_complement)

__all__ = [
    "Backbone", "BiMixer", "Block", "ClassifierHead", "MambaConfig", "MambaLM", "MaskedLM",
    "Mixer", "RCEmbedding", "RCLMHead", "RCWrapper", "RMSNorm", "SequenceClassifier",
    "complement_table", "conjoin_rc", "init_weights", "mask_tokens", "param_groups", "pool",
    "reverse_complement",
]
