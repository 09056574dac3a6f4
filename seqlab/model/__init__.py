"""Mamba model layer: mixers, backbone, heads, reverse-complement equivariance."""
from .backbone import Backbone, Block, MambaLM, RMSNorm, init_weights, param_groups
from .bidirectional import BiMixer
from .config import MambaConfig
from .heads import ClassifierHead, MaskedLM, SequenceClassifier, mask_tokens, pool
from .mixer import Mixer
from .rc import (RCEmbedding, RCLMHead, RCWrapper, complement_table, conjoin_rc,
                 reverse_complement)

__all__ = [
    "Backbone", "BiMixer", "Block", "ClassifierHead", "MambaConfig", "MambaLM", "MaskedLM",
    "Mixer", "RCEmbedding", "RCLMHead", "RCWrapper", "RMSNorm", "SequenceClassifier",
    "complement_table", "conjoin_rc", "init_weights", "mask_tokens", "param_groups", "pool",
    "reverse_complement",
]
