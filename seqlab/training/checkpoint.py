"""seqlab's checkpoint format: one folder, written atomically, verified before it is read.

    model.safetensors    every tensor of the model's state dict, each storage once: a tensor
                         that shares storage with an earlier key (``lm_head.weight`` tied to
                         the embedding, a reverse projection tied to the forward one) is left
                         out and listed in the metadata entry "ties" as {alias: source}.
    config.json          {"seqlab_version", "format_version", "architecture",
                          "model": MambaConfig.to_dict() (null for a model that is not one of
                                   seqlab's, e.g. a test's toy network),
                          "head": constructor kwargs of the head (SequenceClassifier),
                          "extra": what the task that made the model knows about it, JSON-able:
                                   "classes" and "window" of a species classifier, "window" of
                                   a DNA LM, "audio" settings of an audio LM, "task" of a
                                   synthetic-task LM, or whatever a save_model caller passes,
                          "ties": {alias: source},
                          "complement": {module: table}, only where an RC module's id ->
                                   complement table is not seqlab's byte table (a converted
                                   Caduceus-PS model keeps Caduceus' token ids)}
    optimizer.pt         trainer checkpoints: the optimizer state (read with weights_only=True)
    trainer_state.json   trainer checkpoints: {"step", "world_size", "trainer": TrainerConfig, ...}
    checksums.json       size and SHA-256 of every other file

:func:`write_checkpoint` is the one writer: :func:`save_model` and the trainer's step_NNNNNNN
folders both go through it. It writes into a temporary folder beside the target, fsyncs it
and renames it, so a crash never leaves a folder under the final name that looks complete.
:func:`verify_checkpoint` checks a folder against checksums.json before anything is read.

Reading: :func:`checkpoint_meta` gives config.json in the layout above, also for the trainer
layout of format_version 0 (config.json with "architecture" and "model" but no
"seqlab_version", the head's kwargs and the task's info as top-level keys); the one loader,
:func:`seqlab.training.pretrained.load_model`, builds the model from it.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .. import model as models
from ..errors import CheckpointError
from ..model.config import MambaConfig
from ..model.rc import RCEmbedding, RCLMHead, complement_table
from ..utils import atomic_directory
from ..version import __version__

FORMAT_VERSION = 1
ARCHITECTURES = ("MambaLM", "SequenceClassifier", "MaskedLM", "Backbone")
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CHECKSUMS_NAME = "checksums.json"
OPTIMIZER_NAME = "optimizer.pt"
TRAINER_STATE_NAME = "trainer_state.json"

# format_version 0 (trainer layout): the keys of config.json that hold the head's constructor kwargs.
_TRAINER_LAYOUT_HEAD_KEYS = ("num_classes", "pooling", "conjoin_rc", "dropout")


def _classifier_kwargs(model) -> dict:
    head = model.head
    return {"num_classes": head.proj.out_features, "pooling": head.pooling,
            "conjoin_rc": bool(model.conjoin), "dropout": float(head.dropout.p)}


# Constructor keyword arguments of each head, read back from the module so that the loader
# can rebuild it.
_HEAD_KWARGS = {"SequenceClassifier": _classifier_kwargs}


# ============================================================================ writing
def describe_model(model: torch.nn.Module, extra: dict | None = None) -> dict:
    """config.json's description of ``model`` (before versions and ties): architecture,
    MambaConfig, head kwargs, ``extra`` and any custom complement tables.

    Any module can be described (the trainer checkpoints whatever its task builds); only the
    architectures of :data:`ARCHITECTURES` can be rebuilt by the loader.
    """
    architecture = type(model).__name__
    head = {}
    if architecture in _HEAD_KWARGS:
        try:
            head = _HEAD_KWARGS[architecture](model)
        except AttributeError as err:
            raise AttributeError(f"cannot read the {architecture}'s constructor arguments back "
                                 f"from the module ({err}); seqlab.training.checkpoint."
                                 "_HEAD_KWARGS needs updating") from err
    extra = dict(extra or {})
    try:
        json.dumps(extra)
    except TypeError as err:
        raise TypeError(f"checkpoint extra must be JSON-serialisable: {err}") from err
    config = getattr(model, "config", None)
    meta = {"architecture": architecture,
            "model": config.to_dict() if isinstance(config, MambaConfig) else None,
            "head": head, "extra": extra}
    complements = _custom_complements(model)
    if complements:  # e.g. a converted Caduceus-PS model on Caduceus' own token ids
        meta["complement"] = complements
    return meta


def write_checkpoint(directory: str | os.PathLike, state: dict[str, torch.Tensor], meta: dict,
                     optimizer_state: dict | None = None, trainer_state: dict | None = None
                     ) -> Path:
    """Write one checkpoint folder atomically (see the module docstring); returns it.

    state: the model's state dict (tied tensors are stored once); meta: :func:`describe_model`'s
    dict; optimizer_state and trainer_state: a trainer's, written beside the weights.
    An existing folder at ``directory`` is replaced as a whole.
    """
    directory = Path(directory)
    tensors, ties = _dedup_shared(state, directory)
    config = {"seqlab_version": __version__, "format_version": FORMAT_VERSION, **meta,
              "ties": ties}
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"ties": json.dumps(ties),
                                                               "format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_NAME)
        if trainer_state is not None:
            (tmp / TRAINER_STATE_NAME).write_text(
                json.dumps(trainer_state, indent=2, sort_keys=True, default=str) + "\n")
        write_checksums(tmp)
    return directory


def save_model(model: torch.nn.Module, directory: str | os.PathLike, config: MambaConfig,
               extra: dict | None = None) -> Path:
    """Write ``model`` to ``directory`` as a checkpoint folder (weights, config.json,
    checksums.json), atomically.

    ``model`` is one of seqlab.model's MambaLM, SequenceClassifier, MaskedLM or Backbone;
    ``config`` the MambaConfig it was built from; ``extra`` any JSON-able dict (tokenizer,
    training step, provenance) stored verbatim under config.json's "extra". An existing
    seqlab checkpoint at ``directory`` is replaced; any other non-empty directory is refused.
    Returns the directory.
    """
    directory = Path(directory)
    architecture = type(model).__name__
    if architecture not in ARCHITECTURES:
        raise TypeError(f"save_model({directory}): cannot save a {architecture}; "
                        f"supported architectures are {list(ARCHITECTURES)}")
    model_config = getattr(model, "config", None)
    if isinstance(model_config, MambaConfig) and model_config != config:
        raise ValueError(f"save_model({directory}): the config passed differs from model.config; "
                         "pass the MambaConfig the model was built from")
    try:
        meta = describe_model(model, extra)
    except (AttributeError, TypeError) as err:
        raise type(err)(f"save_model({directory}): {err}") from err
    meta["model"] = config.to_dict()
    _refuse_foreign_directory(directory)
    return write_checkpoint(directory, model.state_dict(), meta)


# ============================================================================ reading
def read_config(directory: Path) -> dict:
    """config.json of a checkpoint folder as it is on disk (any format)."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}, so no known checkpoint format "
                                f"(files present: {present})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def is_seqlab(raw: dict) -> bool:
    """Whether config.json content ``raw`` is seqlab's (either layout)."""
    return "seqlab_version" in raw or (isinstance(raw.get("architecture"), str)
                                       and isinstance(raw.get("model"), dict))


def checkpoint_meta(directory: Path, raw: dict) -> dict:
    """config.json content ``raw`` of a seqlab checkpoint in the current layout (the module
    docstring); a format_version 0 trainer checkpoint is mapped onto it here, once."""
    where = directory / CONFIG_NAME
    if "seqlab_version" in raw:
        if raw.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(f"{where}: format_version={raw['format_version']} was written by a "
                             f"newer seqlab ({raw['seqlab_version']}); upgrade seqlab")
        return {"head": {}, "extra": {}, **raw}
    if not is_seqlab(raw):
        raise ValueError(f"{where}: not a seqlab checkpoint (no 'seqlab_version', no "
                         f"'architecture' and 'model'); found keys {sorted(raw)}")
    architecture = raw["architecture"]
    head = ({k: raw[k] for k in _TRAINER_LAYOUT_HEAD_KEYS if k in raw}
            if architecture in _HEAD_KWARGS else {})
    extra = {k: v for k, v in raw.items()
             if k not in ("architecture", "model", *_TRAINER_LAYOUT_HEAD_KEYS)}
    return {"format_version": 0, "architecture": architecture, "model": raw["model"],
            "head": head, "extra": extra}


def read_state(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a seqlab checkpoint's weights, tied aliases filled in (CPU)."""
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{directory}: holds {CONFIG_NAME} but no {WEIGHTS_NAME}")
    state = read_safetensors(weights)
    with safe_open(str(weights), framework="pt") as f:
        ties = json.loads((f.metadata() or {}).get("ties", "{}"))
    for alias, source in ties.items():
        if source not in state:
            raise KeyError(f"{weights}: tie {alias!r} -> {source!r} names a tensor the file lacks")
        state[alias] = state[source]
    return state


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load a checkpoint folder's weights into ``model`` (strict; the trainer's resume)."""
    load_state(model, read_state(directory), directory / WEIGHTS_NAME, strict=True)


def build_model(architecture: str, config: MambaConfig, head: dict) -> torch.nn.Module:
    """An untrained seqlab model of ``architecture`` (float32, CPU)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r} cannot be rebuilt; seqlab's "
                         f"architectures are {list(ARCHITECTURES)}")
    return getattr(models, architecture)(config, **head)


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path,
               strict: bool) -> None:
    """load_state_dict with errors that name the file, the keys and the shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if strict and (missing or unexpected):
        raise KeyError(f"{source}: weights do not match the {type(model).__name__}: "
                       f"missing keys {key_list(missing)}, unexpected keys "
                       f"{key_list(unexpected)}; the checkpoint was written for a different "
                       "model or config")
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
           for k in expected if k in state and state[k].shape != expected[k].shape]
    if bad:
        raise ValueError(f"{source}: tensor shapes differ from the model's: {bad[:8]}")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError, with no file name
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def rc_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every reverse-complement embedding / LM head of ``model``."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (RCEmbedding, RCLMHead))]


def key_list(keys: list[str], limit: int = 12) -> str:
    """Keys for a message: the first ``limit``, then how many more."""
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"[{shown}{more}]" if keys else "[]"


# ============================================================================ integrity
def write_checksums(directory: str | os.PathLike) -> dict:
    """Record the size and SHA-256 of every file in ``directory`` as checksums.json.

    Called on a checkpoint's temporary folder just before it is published;
    :func:`verify_checkpoint` checks a folder against it before anything is loaded."""
    directory = Path(directory)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != CHECKSUMS_NAME}
    record = {"format_version": 1, "files": files}
    (directory / CHECKSUMS_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def verify_checkpoint(directory: str | os.PathLike, require: tuple[str, ...] = ()) -> None:
    """Raise CheckpointError (naming the file and what is wrong) unless ``directory`` holds an
    intact checkpoint.

    With checksums.json: each recorded file must be present with its recorded size and
    SHA-256. Without it (format_version 0 checkpoints, or a folder assembled by hand):
    config.json and JSON files must parse, the safetensors header must describe exactly the
    file's size, and pickled optimizer states must be whole zip archives. ``require`` names
    files that must be present in either case (e.g. trainer_state.json to resume).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint folder")
    for name in (CONFIG_NAME, WEIGHTS_NAME, *require):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory}: {name} is missing")
    sums = directory / CHECKSUMS_NAME
    if sums.is_file():
        try:
            record = json.loads(sums.read_text())
            files = record["files"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{sums}: unreadable ({err})") from None
        for name, want in files.items():
            path = confined_path(directory, name, CHECKSUMS_NAME)
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (recorded in {CHECKSUMS_NAME})")
            size = path.stat().st_size
            if size != want.get("bytes"):
                raise CheckpointError(f"{path}: {size} bytes, {want.get('bytes')} when written "
                                      "(truncated or replaced)")
            if _sha256(path) != want.get("sha256"):
                raise CheckpointError(f"{path}: contents differ from when it was written "
                                      "(SHA-256 mismatch)")
        return
    for path in sorted(directory.iterdir()):
        if path.suffix == ".json":
            try:
                json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{path}: not valid JSON ({err})") from None
        elif path.suffix == ".safetensors":
            _check_safetensors_size(path)
        elif path.suffix in (".pt", ".bin"):
            try:
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
            except (zipfile.BadZipFile, OSError, EOFError) as err:
                raise CheckpointError(f"{path}: not a whole torch archive ({err})") from None
            if bad is not None:
                raise CheckpointError(f"{path}: member {bad} is corrupt")


def confined_path(directory: Path, name: str, named_in: str) -> Path:
    """``directory / name`` when it stays inside ``directory``; CheckpointError otherwise.

    Index files and checksums name files by relative path; a downloaded checkpoint must not
    make seqlab read outside its own folder (absolute paths, '..', links out)."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name:
        raise CheckpointError(f"{directory / named_in}: names {name!r}, which is not a relative "
                              "path inside the checkpoint folder; refusing to read it")
    root = directory.resolve()
    path = (directory / name).resolve()
    if path != root and root not in path.parents:
        raise CheckpointError(f"{directory / named_in}: names {name!r}, which lies outside the "
                              f"checkpoint folder {directory}; refusing to read it")
    return directory / name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _check_safetensors_size(path: Path) -> None:
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (struct.error, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: {size} bytes, but its header describes {8 + n + end} "
                              "(truncated or padded)")


# ============================================================================ helpers
def _dedup_shared(state: dict[str, torch.Tensor], where: Path
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep each storage once: later keys that alias an earlier tensor become {alias: source}.
    The one place seqlab ties weights on disk; the tensors come back contiguous on the CPU."""
    seen: dict[tuple, str] = {}
    storages: dict[int, str] = {}
    tensors, ties = {}, {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 tuple(t.stride()), t.dtype)
        if ident in seen:
            ties[key] = seen[ident]
            continue
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in storages:
            raise ValueError(f"{where}: {key!r} is a partial view of {storages[ptr]!r}; "
                             "safetensors stores whole tensors only: clone one of them")
        if t.numel():
            storages[ptr] = key
        seen[ident] = key
        tensors[key] = t.detach().contiguous().cpu()
    return tensors, ties


def _custom_complements(model: torch.nn.Module) -> dict[str, list[int]]:
    """Complement tables (not persistent buffers) that differ from seqlab's byte table."""
    out = {}
    for name, module in rc_modules(model):
        table = module.complement.detach().cpu()
        if not torch.equal(table, complement_table(table.numel())):
            out[name] = table.tolist()
    return out


def _refuse_foreign_directory(directory: Path) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise FileExistsError(f"save_model: {directory} exists and is not a directory")
    config = directory / CONFIG_NAME
    is_ours = config.is_file() and "seqlab_version" in read_config(directory)
    if any(directory.iterdir()) and not is_ours:
        raise FileExistsError(f"save_model: {directory} is a non-empty directory that is not a "
                              "seqlab checkpoint; refusing to replace it. Choose another path")


__all__ = ["save_model", "write_checkpoint", "describe_model", "verify_checkpoint",
           "write_checksums", "checkpoint_meta", "read_state", "load_weights", "FORMAT_VERSION"]
