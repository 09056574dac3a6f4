"""Glue shared by the jobs: typed configs from a composed recipe, paths, the run directory."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..model.config import MambaConfig
from ..train import RunDir, Trainer, TrainerConfig
from ..utils import atomic_write_json, repo_root

log = logging.getLogger("seqlab")


def typed(schema, node, where: str):
    """Validate a config node against a dataclass (unknown keys and bad types raise)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node or {})
    except Exception as exc:  # omegaconf raises several error types; name the node for the user
        raise SystemExit(f"seqlab: invalid `{where}` config: {exc}") from exc
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
    raise SystemExit(f"seqlab: {what} {p} not found (looked in {Path.cwd()} and {repo_root()})")


def make_trainer(cfg: DictConfig) -> Trainer:
    tcfg = trainer_config(cfg)
    run = RunDir(cfg.run_dir)
    return Trainer(tcfg, run, config_text=OmegaConf.to_yaml(cfg, resolve=True))


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
    """Run directory of a job without training: writes config.yaml and status "running", yields
    (run, summary dict to fill); on success writes summary.json then status "completed", on any
    error status "failed" with the error, so a broken run never looks complete."""
    run = RunDir(cfg.run_dir)
    run.write_config(OmegaConf.to_yaml(cfg, resolve=True))
    run.set_status("running")
    summary: dict = {}
    try:
        yield run, summary
        atomic_write_json(run.path / "summary.json", summary)
        run.set_status("completed")
    except BaseException as exc:
        run.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
