"""Job `probe`: a cross-validated scikit-learn probe on an embeddings file (seqlab.tasks.probe)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ..tasks.common import resolve_path
from ..tasks.embeddings import load_embeddings
from ..tasks.probe import probe_and_report
from .common import print_summary, tracked_run


def probe(cfg: DictConfig) -> dict:
    with tracked_run(cfg) as (run, summary):
        emb = load_embeddings(resolve_path(cfg.embeddings, what="embeddings file"))
        summary.update(probe_and_report(emb, cfg.probe, run, Path(cfg.embeddings).name))
    print_summary("probe", summary, run)
    return summary
