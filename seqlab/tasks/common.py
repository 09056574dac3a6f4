"""What the tasks share: typed sections of a composed recipe, paths of user inputs, the
species manifest."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..data.species import SpeciesManifest
from ..errors import ConfigError, MissingInput
from ..model.config import MambaConfig
from ..utils import repo_root


def typed(schema, node, where: str):
    """Validate a config node against a dataclass (unknown keys and bad types raise)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node or {})
    except Exception as exc:  # omegaconf raises several error types; name the node for the user
        raise ConfigError(f"invalid `{where}` config: {exc}") from None
    return OmegaConf.to_object(merged)


def model_config(cfg: DictConfig) -> MambaConfig:
    return typed(MambaConfig, cfg.get("model"), "model")


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



def load_manifest(cfg: DictConfig) -> SpeciesManifest:
    """The species manifest named by ``data.manifest`` (``data.fold_case`` applied)."""
    path = resolve_path(cfg.data.manifest, what="species manifest")
    return SpeciesManifest.load(path, fold_case=bool(cfg.data.get("fold_case", True)))


__all__ = ["typed", "model_config", "resolve_path", "load_manifest"]
