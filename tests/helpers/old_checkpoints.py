"""Checkpoints in the trainer layout of format_version 0, written here byte for byte as the
trainer wrote them (users have runs on disk in it): model.safetensors with the tied tensors
stored once and listed in the metadata entry "ties", and a config.json holding the task's
model spec at its top level ({"architecture", "model", "num_classes", "pooling",
"conjoin_rc", "classes", "window", "audio", "task"}, as the task had them); no
"seqlab_version", no checksums.json."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_v0_checkpoint(model: torch.nn.Module, folder: Path, spec: dict,
                        optimizer: bool = False) -> Path:
    """Write ``model``'s weights and ``spec`` (config.json's content) into ``folder``."""
    folder.mkdir(parents=True)
    seen, tensors, ties = {}, {}, {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if key in seen:
            ties[k] = seen[key]
        else:
            seen[key] = k
            tensors[k] = v.contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"ties": json.dumps(ties)})
    (folder / "config.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    if optimizer:
        torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
        (folder / "trainer_state.json").write_text(json.dumps({"step": 3}) + "\n")
    return folder
