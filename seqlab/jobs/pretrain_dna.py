"""Job `pretrain_dna`: byte-level pretraining on FASTA windows (seqlab.tasks.dna_pretrain)."""
from __future__ import annotations

from omegaconf import DictConfig

from ..tasks.dna_pretrain import DNAPretrainTask
from .common import fit, print_summary


def pretrain_dna(cfg: DictConfig) -> dict:
    summary, trainer = fit(cfg, DNAPretrainTask)
    if trainer.dist.is_main:
        print_summary("pretrain_dna", summary, trainer.run)
    return summary
