"""Glue shared by the jobs: the trainer of a training job, the run directory of a job that
does not train, and the summary printed at the end.

Threads: the ``seqlab run`` command sizes torch's pool from ``cpu_threads`` before it calls a
job (seqlab.cli, seqlab.utils.set_threads); jobs do not set it again. A library caller of
seqlab.cli.run_job sets it with seqlab.utils.set_threads.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

from omegaconf import DictConfig, OmegaConf

from ..errors import RunDirError
from ..tasks.common import typed
from ..training.rundir import RunDir
from ..training.trainer import Trainer, TrainerConfig
from ..utils import atomic_write_json

log = logging.getLogger("seqlab")


def trainer_config(cfg: DictConfig) -> TrainerConfig:
    return typed(TrainerConfig, cfg.get("trainer"), "trainer")


def make_trainer(cfg: DictConfig) -> Trainer:
    """The Trainer of a training job; it writes nothing until :meth:`Trainer.fit` starts."""
    tcfg = trainer_config(cfg)
    return Trainer(tcfg, RunDir(cfg.run_dir), config_text=OmegaConf.to_yaml(cfg, resolve=True),
                   config=OmegaConf.to_container(cfg, resolve=True))


def fit(cfg: DictConfig, task_factory, trainer: Trainer | None = None) -> tuple[dict, Trainer]:
    """Lock the run directory, build the task (``task_factory(cfg)``), train it.

    The lock comes first, so a second run on the same directory stops at once; a task that
    cannot be built (bad data, say) leaves the directory as it was. ``trainer``: one made by
    :func:`make_trainer` and adjusted by the job (default: a new one)."""
    trainer = trainer or make_trainer(cfg)
    trainer.run.acquire()
    try:
        task = task_factory(cfg)
    except BaseException:
        trainer.run.abandon()
        raise
    return trainer.fit(task, resume=cfg.get("resume", True)), trainer


def print_summary(title: str, summary: dict, run: RunDir) -> None:
    """The summary's numbers and strings under a title."""
    lines = [f"== {title} ==", f"run directory: {run.path}"]
    for k, v in summary.items():
        if isinstance(v, float):
            lines.append(f"  {k}: {v:.4g}")
        elif isinstance(v, (int, str)):
            lines.append(f"  {k}: {v}")
    print("\n".join(lines), flush=True)


@contextmanager
def tracked_run(cfg: DictConfig):
    """Run directory of a job without training: locks it, writes config.yaml and status
    "running", yields (run, summary dict to fill); on success writes summary.json then status
    "completed", on any error status "failed" (or "interrupted") with the error, so a broken
    run never looks complete. A directory holding a completed run is refused."""
    run = RunDir(cfg.run_dir)
    with run:
        status = run.status()
        if status and status.get("status") == "completed":
            raise RunDirError(f"run_dir {run.path} already holds a completed run; choose another "
                              "run_dir (or leave run_dir unset for a new one)")
        run.begin(OmegaConf.to_yaml(cfg, resolve=True))
        summary: dict = {}
        yield run, summary
        atomic_write_json(run.path / "summary.json", summary)
        run.complete()
