"""Glue shared by the jobs: typed configs from a composed recipe, paths, the run directory."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError, MissingInput, RunDirError
from ..model.config import MambaConfig
from ..rundir import RunDir
from ..train import Trainer, TrainerConfig
from ..utils import atomic_write_json, repo_root

log = logging.getLogger("seqlab")


def typed(schema, node, where: str):
    """Validate a config node against a dataclass (unknown keys and bad types raise)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node or {})
    except Exception as exc:  # omegaconf raises several error types; name the node for the user
        raise ConfigError(f"invalid `{where}` config: {exc}") from None
    return OmegaConf.to_object(merged)


def model_config(cfg: DictConfig) -> MambaConfig:
    return typed(MambaConfig, cfg.get("model"), "model")


def trainer_config(cfg: DictConfig) -> TrainerConfig:
    return typed(TrainerConfig, cfg.get("trainer"), "trainer")


def resolve_path(p: str | Path, must_exist: bool = True, what: str = "file") -> Path:
    """A path as given (absolute, or relative to the working directory), else relative to the
    seqlab source tree (where the bundled datasets/ live)."""
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path
    alt = repo_root() / path
    if alt.exists() or not must_exist:
        return alt if alt.exists() else path
    raise MissingInput(f"{what} {p} not found (looked in {Path.cwd()} and {repo_root()})")


def make_trainer(cfg: DictConfig) -> Trainer:
    """The Trainer of a training job; it writes nothing until :meth:`Trainer.fit` starts."""
    tcfg = trainer_config(cfg)
    return Trainer(tcfg, RunDir(cfg.run_dir), config_text=OmegaConf.to_yaml(cfg, resolve=True),
                   config=OmegaConf.to_container(cfg, resolve=True))


def fit(cfg: DictConfig, task_factory) -> tuple[dict, Trainer]:
    """Lock the run directory, build the task (``task_factory(cfg)``), train it.

    The lock comes first, so a second run on the same directory stops at once; a task that
    cannot be built (bad data, say) leaves the directory as it was."""
    trainer = make_trainer(cfg)
    trainer.run.acquire()
    try:
        task = task_factory(cfg)
    except BaseException:
        trainer.run.abandon()
        raise
    return trainer.fit(task, resume=cfg.get("resume", True)), trainer


def print_summary(title: str, summary: dict, run: RunDir) -> None:
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
