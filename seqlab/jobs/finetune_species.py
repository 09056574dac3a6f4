"""Job `finetune_species`: train a species classifier on genome windows (seqlab.tasks.species),
report on held-out strains, then embed the test windows and probe them."""
from __future__ import annotations

from omegaconf import DictConfig

from ..tasks.species import SpeciesTask
from .common import fit, print_summary


def finetune_species(cfg: DictConfig) -> dict:
    summary, trainer = fit(cfg, SpeciesTask)
    if trainer.dist.is_main:
        print_summary("finetune_species", summary, trainer.run)
        for key in ("training_plot", "confusion_plot", "probe_plot"):
            if key in summary:
                print(f"plot: {summary[key]}")
    return summary
