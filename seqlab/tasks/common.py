"""What the tasks share: typed sections of a composed recipe, paths of user inputs, the
species manifest."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..data.species import SpeciesManifest
from ..errors import ConfigError, MissingInput
from ..model.config import MambaConfig
from ..settings import resource_root


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
    folder holding seqlab's bundled data (so ``datasets/bacteria/manifest.yaml`` works from
    any directory, in a wheel or a checkout)."""
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path
    root = resource_root()
    alt = root / path
    if alt.exists() or not must_exist:
        return alt if alt.exists() else path
    hint = ""
    if path.parts and path.parts[0] == "datasets":
        hint = ("; the bundled data ships with seqlab (its wheel and its source): reinstall it, "
                "or point the setting at your own data (`seqlab prepare species --help`)")
    raise MissingInput(f"{what} {p} not found (looked in {Path.cwd()} and {root}){hint}")



def load_manifest(cfg: DictConfig) -> SpeciesManifest:
    """The species manifest named by ``data.manifest`` (``data.fold_case`` applied)."""
    path = resolve_path(cfg.data.manifest, what="species manifest")
    return SpeciesManifest.load(path, fold_case=bool(cfg.data.get("fold_case", True)))


__all__ = ["typed", "model_config", "resolve_path", "load_manifest"]
