"""The schema of every job's config, checked after Hydra has composed a recipe.

Every key of every section (top level, ``data``, ``head``, ``eval``, ``sample``, ``post``,
``probe``, ``model``, ``trainer``) is declared here with its type, whatever recipe or override
it came from; :func:`validate` rejects an unknown key with its name and the closest valid one,
a value of the wrong type with its key, and a mandatory value left unset (``???``) with the
override that sets it. The recipe files give the values; this module gives the shape.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import ConfigError
from ..model.config import MambaConfig
from ..training.trainer import TrainerConfig

MISSING = "???"


# ----------------------------------------------------------------------------- shared sections
@dataclass
class ProbeConfig:
    estimator: str = "logistic"  # logistic | knn | linear_svm
    folds: int = 5
    group_split: bool = False
    seed: int = 0
    C: float = 1.0
    kmer_baseline: bool = True  # cross-validate a k-mer logistic regression in the same folds


# ----------------------------------------------------------------------------- DNA
@dataclass
class SpeciesBaseline:
    kmer: bool = True  # k-mer logistic regression on the same windows, beside the model
    ks: list[int] = field(default_factory=lambda: [3, 4, 5, 6])  # k chosen on validation
    max_train_windows: int = 20_000  # the first windows the model trained on
@dataclass
class SpeciesData:
    manifest: str = "datasets/bacteria/manifest.yaml"
    window: int = 1024
    rc_augment: bool = True
    max_n_frac: float = 0.1
    fold_case: bool = True
    eval_stride: Optional[int] = None
    eval_max_per_species: Optional[int] = 48
    test_max_per_species: Optional[int] = 150


@dataclass
class HeadConfig:
    pooling: str = "mean"  # mean | max | first | last
    conjoin_rc: bool = False


@dataclass
class PostConfig:
    embed_probe: bool = True


@dataclass
class FinetuneSpeciesJob:
    job: str = "finetune_species"
    recipe: str = "finetune_species"
    run_dir: Optional[str] = None
    init_from: Optional[str] = None
    resume: bool = True
    cpu_threads: int = 0
    eval_batch_size: int = 32
    model: MambaConfig = field(default_factory=MambaConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: SpeciesData = field(default_factory=SpeciesData)
    head: HeadConfig = field(default_factory=HeadConfig)
    post: PostConfig = field(default_factory=PostConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    baseline: SpeciesBaseline = field(default_factory=SpeciesBaseline)


@dataclass
class PretrainData:
    manifest: Optional[str] = "datasets/bacteria/manifest.yaml"
    fasta: Any = field(default_factory=list)  # a path or a list of paths
    window: int = 1024
    rc_augment: bool = True
    max_n_frac: float = 0.1
    fold_case: bool = True
    eval_windows: int = 64


@dataclass
class PretrainDnaJob:
    job: str = "pretrain_dna"
    recipe: str = "pretrain_dna"
    run_dir: Optional[str] = None
    resume: bool = True
    cpu_threads: int = 0
    eval_batch_size: int = 16
    model: MambaConfig = field(default_factory=MambaConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: PretrainData = field(default_factory=PretrainData)


@dataclass
class EmbedData:
    manifest: Optional[str] = "datasets/bacteria/manifest.yaml"
    split: str = "test"
    max_per_species: Optional[int] = 200
    fasta: Optional[str] = None
    bed: Optional[str] = None
    window: Optional[int] = None
    stride: Optional[int] = None
    max_n_frac: float = 0.1
    fold_case: bool = True


@dataclass
class EmbedJob:
    job: str = "embed"
    recipe: str = "embed"
    run_dir: Optional[str] = None
    checkpoint: str = MISSING
    output: Optional[str] = None
    device: str = "auto"
    cpu_threads: int = 0
    batch_size: int = 32
    chunk: Optional[int] = 8192
    max_tokens: Optional[int] = 131072
    progress: bool = True
    data: EmbedData = field(default_factory=EmbedData)


@dataclass
class ProbeJob:
    job: str = "probe"
    recipe: str = "probe"
    run_dir: Optional[str] = None
    embeddings: str = MISSING
    cpu_threads: int = 0
    probe: ProbeConfig = field(default_factory=ProbeConfig)


# ----------------------------------------------------------------------------- synthetic
@dataclass
class SyntheticData:
    task: str = "induction"  # induction | selective_copy
    seq_len: int = 64
    vocab_size: int = 16
    n_content: Optional[int] = None  # selective_copy only
    seed: int = 0
    eval_seed: int = 1_000_000
    curriculum: Optional[Any] = None  # [[from_step, seq_len], ...]


@dataclass
class SyntheticEval:
    n_samples: int = 512
    batch_size: int = 128
    extrapolate: list[int] = field(default_factory=list)
    extrapolate_samples: int = 64
    chunk: int = 4096


@dataclass
class SyntheticJob:
    job: str = "synthetic"
    recipe: str = "synthetic"
    run_dir: Optional[str] = None
    resume: bool = True
    cpu_threads: int = 0
    model: MambaConfig = field(default_factory=MambaConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: SyntheticData = field(default_factory=SyntheticData)
    eval: SyntheticEval = field(default_factory=SyntheticEval)


# ----------------------------------------------------------------------------- audio
@dataclass
class AudioData:
    source: str = "datasets/speech/manifest.yaml"
    split_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    rate: int = 16000
    clip_seconds: float = 0.25
    mode: str = "crop"  # pad | crop
    crops_per_file: int = 4
    encoding: str = "mulaw"  # mulaw | linear
    normalize: bool = True


@dataclass
class AudioEval:
    mode: str = "clips"  # clips | files
    batch_size: int = 8
    max_clips: int = 16
    max_files: int = 16
    chunk_seconds: float = 1.0


@dataclass
class AudioSample:
    seconds: float = 0.5
    budget_share: float = 0.1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class AudioBaseline:
    enabled: bool = True  # xz -9 and an order-2 context model on the same held-out codes


@dataclass
class TrainAudioJob:
    job: str = "train_audio"
    recipe: str = "train_audio"
    run_dir: Optional[str] = None
    resume: bool = True
    cpu_threads: int = 0
    model: MambaConfig = field(default_factory=MambaConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: AudioData = field(default_factory=AudioData)
    eval: AudioEval = field(default_factory=AudioEval)
    sample: AudioSample = field(default_factory=AudioSample)
    baseline: AudioBaseline = field(default_factory=AudioBaseline)


@dataclass
class GenerateAudioJob:
    job: str = "generate_audio"
    recipe: str = "generate_audio"
    run_dir: Optional[str] = None
    checkpoint: str = MISSING
    device: str = "auto"
    cpu_threads: int = 0
    dtype: str = "auto"
    n_samples: int = 4
    seconds: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    prompt: Optional[str] = None
    prompt_normalize: Optional[bool] = None
    prompt_seconds: Optional[float] = None
    max_prompt_seconds: float = 10.0
    cuda_graph: Any = "auto"  # auto | true | false
    progress: bool = True


JOB_SCHEMAS: dict[str, type] = {
    "finetune_species": FinetuneSpeciesJob,
    "pretrain_dna": PretrainDnaJob,
    "embed": EmbedJob,
    "probe": ProbeJob,
    "synthetic": SyntheticJob,
    "train_audio": TrainAudioJob,
    "generate_audio": GenerateAudioJob,
}

# What to tell a user who left a mandatory key unset.
_MANDATORY_HINTS = {
    "checkpoint": "a run directory, its checkpoints/ folder, a step_* or a checkpoint folder",
    "embeddings": "an .npz file written by `seqlab run embed`",
}


# ----------------------------------------------------------------------------- validation
def validate(cfg: DictConfig) -> None:
    """Raise ConfigError unless ``cfg`` fits its job's schema (see the module docstring)."""
    job = cfg.get("job")
    schema = JOB_SCHEMAS.get(job)
    if schema is None:
        raise ConfigError(f"recipe {cfg.get('recipe')!r} has job={job!r}; known jobs are "
                          f"{', '.join(JOB_SCHEMAS)}")
    tree = OmegaConf.to_container(cfg, resolve=False)
    _unknown_keys(tree, schema, "")
    _unset_keys(tree, schema, "")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_words(err)) from None
    try:
        MambaConfig(**OmegaConf.to_container(merged.model, resolve=True)) if "model" in merged \
            else None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from None


def _fields(schema) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(schema)}


def _sub_schema(f: dataclasses.Field):
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return type(default) if dataclasses.is_dataclass(default) else None


def _unknown_keys(tree: dict, schema, prefix: str) -> None:
    known = _fields(schema)
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            where = f"section `{prefix[:-1]}`" if prefix else "the top level"
            raise ConfigError(f"unknown key {name}{hint} (known keys of {where}: "
                              f"{', '.join(sorted(known))})")
        sub = _sub_schema(known[key])
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{name} is a section (keys {', '.join(sorted(_fields(sub)))}), "
                                  f"not a value: got {value!r}")
            _unknown_keys(value, sub, f"{name}.")


def _unset_keys(tree: dict, schema, prefix: str) -> None:
    known = _fields(schema)
    for key, f in known.items():
        sub = _sub_schema(f)
        value = tree.get(key)
        if sub is not None and isinstance(value, dict):
            _unset_keys(value, sub, f"{prefix}{key}.")
        elif value == MISSING or (key not in tree and f.default == MISSING):
            what = _MANDATORY_HINTS.get(key, "a value")
            raise ConfigError(f"{prefix}{key} is required: add {prefix}{key}=<{what}> to the "
                              "command")


def _omegaconf_words(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    return f"{key}: {msg}" if key else msg


__all__ = ["validate", "JOB_SCHEMAS"]
