"""The one loader: any checkpoint path a user may name -> (model, info).

    path names                                      opened
    a run directory (holds checkpoints/)            its newest intact step_* folder, past
                                                    corrupt ones (RunDir.latest_checkpoint)
    a run's checkpoints/ folder                     the same
    a checkpoint folder (step_* or save_model's)    itself, verified (checksums.json)
    a published mamba_ssm / Hugging Face /          converted through seqlab.training.convert
    Caduceus folder

A run whose status is not "completed" (interrupted, failed, still running) is opened all the
same, with one log line saying so and which checkpoint is used.

``info`` is config.json in the layout of :mod:`seqlab.training.checkpoint` with "model"
replaced by the MambaConfig object, plus "format" ("seqlab", "hf", "mamba_ssm" or
"caduceus") and "path" (the checkpoint folder read). Jobs read what the task knew from
``info["extra"]``: a species classifier's "classes" and "window", an audio LM's "audio".
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..errors import CheckpointError, MissingInput
from ..model.config import MambaConfig
from .checkpoint import (ARCHITECTURES, CONFIG_NAME, build_model, checkpoint_meta, is_seqlab,
                         load_state, rc_modules, read_config, read_state, verify_checkpoint)
from .convert import load_foreign
from .rundir import RunDir, describe_status, read_status

log = logging.getLogger("seqlab")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder that ``path`` names (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise MissingInput(f"{path}: no such checkpoint or run directory; give a run directory, "
                           "its checkpoints/ folder, a step_* folder or a checkpoint folder")
    if not path.is_dir():
        raise MissingInput(f"{path} is not a directory; give a run directory, its checkpoints/ "
                           "folder, a step_* folder or a checkpoint folder")
    if (path / CONFIG_NAME).is_file():
        return path
    run = RunDir(path.parent if path.name == "checkpoints" else path)
    if not run.ckpt_dir.is_dir():
        read_config(path)  # FileNotFoundError naming the files that are there
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        found = [p.name for p in run.checkpoint_dirs()]
        raise CheckpointError(f"{run.path}: no intact checkpoint in {run.ckpt_dir} (step "
                              f"folders: {found or 'none'}); give another run or checkpoint")
    status = read_status(run.path)
    if status is not None and status.get("status") != "completed":
        log.warning("%s; loading its checkpoint %s", describe_status(run.path), ckpt.name)
    return ckpt


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, strict: bool = True
               ) -> tuple[torch.nn.Module, dict]:
    """Open the checkpoint ``path`` names and return ``(model, info)`` (module docstring).

    The model is in eval mode on ``device``, float32 unless ``dtype`` is given. ``strict``
    (default) raises on missing or unexpected keys, naming them.
    """
    folder = resolve_checkpoint(path)
    raw = read_config(folder)
    if not is_seqlab(raw):
        model, fmt = load_foreign(folder, raw)
        model.to(device=device, dtype=dtype).eval()
        return model, {"format": fmt, "architecture": type(model).__name__,
                       "model": getattr(model, "config", None), "head": {}, "extra": {},
                       "path": str(folder)}
    verify_checkpoint(folder)
    meta = checkpoint_meta(folder, raw)
    architecture = meta["architecture"]
    if architecture not in ARCHITECTURES or meta.get("model") is None:
        raise ValueError(f"{folder / CONFIG_NAME}: architecture={architecture!r} cannot be "
                         f"rebuilt; seqlab's architectures are {list(ARCHITECTURES)}")
    config = MambaConfig.from_dict(meta["model"])
    model = build_model(architecture, config, meta.get("head", {}))
    load_state(model, read_state(folder), folder, strict=strict)
    _apply_complements(model, meta.get("complement", {}), folder / CONFIG_NAME)
    model.to(device=device, dtype=dtype).eval()
    return model, dict(meta, model=config, format="seqlab", path=str(folder))


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model of :func:`load_model`, without its info.

    Causal checkpoints (seqlab MambaLM, mamba_ssm, transformers) come back as a MambaLM;
    Caduceus' bidirectional masked LM as a MaskedLM; a species run as its SequenceClassifier.
    """
    return load_model(path, device=device, dtype=dtype)[0]


def _apply_complements(model: torch.nn.Module, tables: dict[str, list[int]], where: Path) -> None:
    """Give RC modules the complement tables config.json records (non-persistent buffers)."""
    modules = dict(rc_modules(model))
    for name, table in tables.items():
        if name not in modules:
            raise KeyError(f"{where}: 'complement' names {name!r}, which is not a "
                           f"reverse-complement module of the {type(model).__name__}")
        if len(table) != modules[name].complement.numel():
            raise ValueError(f"{where}: 'complement' of {name!r} has {len(table)} entries; the "
                             f"module's vocabulary has {modules[name].complement.numel()}")
        modules[name].complement = torch.tensor(table, dtype=torch.long)


__all__ = ["load_model", "load_pretrained", "resolve_checkpoint"]
