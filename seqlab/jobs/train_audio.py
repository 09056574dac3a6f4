"""Job `train_audio`: a causal Mamba LM over 8-bit mu-law codes (seqlab.tasks.audio).

With ``trainer.max_minutes`` the whole job keeps to the budget: training steps get all but
``sample.budget_share`` of it, and the end-of-training sample stops at the job's deadline,
written shorter (the summary says so) or not at all.
"""
from __future__ import annotations

import dataclasses
import time

from omegaconf import DictConfig

from ..errors import ConfigError
from ..tasks.audio import AudioLMTask
from .common import fit, make_trainer, print_summary


def _sample_share(cfg: DictConfig) -> float:
    """The share of ``trainer.max_minutes`` kept from training steps for the sample."""
    if not (cfg.trainer.get("max_minutes") and cfg.sample.seconds > 0):
        return 0.0
    share = float(cfg.sample.get("budget_share", 0.1))
    if not 0.0 <= share < 1.0:
        raise ConfigError(f"seqlab train_audio: sample.budget_share={share}; use a share of "
                          "trainer.max_minutes in [0, 1)")
    return share


def train_audio(cfg: DictConfig) -> dict:
    started = time.monotonic()
    share = _sample_share(cfg)
    trainer = make_trainer(cfg)
    if share:
        # Training steps stop early enough to leave the sample its share of the job's budget;
        # config.yaml keeps the max_minutes the user gave, the deadline of the whole job.
        trainer.cfg = dataclasses.replace(trainer.cfg,
                                          max_minutes=trainer.cfg.max_minutes * (1.0 - share))
    summary, trainer = fit(cfg, lambda c: AudioLMTask(c, started=started), trainer)
    if trainer.dist.is_main:
        print_summary("train_audio", summary, trainer.run)
        for key in ("training_plot", "sample_wav", "sample_plot", "sample_cut", "sample_skipped",
                    "skipped_list"):
            if key in summary:
                print(f"{key}: {summary[key]}")
    return summary
