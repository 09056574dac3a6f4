"""torch.distributed plumbing for training under ``torchrun`` (DDP by default, FSDP2 by switch).

A run started with plain ``python``/``seqlab`` is a world of one and never touches
torch.distributed. Under ``torchrun --nproc_per_node N`` the environment variables RANK,
WORLD_SIZE and LOCAL_RANK are set and :func:`init` joins the process group (NCCL on CUDA,
gloo on CPU).
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device: torch.device) -> DistInfo:
    """Join the process group if launched by torchrun; return this process's rank info."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        # Tear the group down before the interpreter does: left to the process's exit, gloo's
        # worker threads were sometimes destroyed while joinable ("terminate called without an
        # active exception", SIGABRT in one rank of a finished run).
        atexit.register(shutdown)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def world_size() -> int:
    """Processes in the group (1 outside torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks (identity in a world of one)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def broadcast_object(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_model(model: torch.nn.Module, strategy: str, device: torch.device,
               info: DistInfo) -> torch.nn.Module:
    """Wrap for data parallelism: "ddp" (DistributedDataParallel) or "fsdp" (FSDP2 fully_shard,
    one shard group per block, then the root)."""
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for module in model.modules():
            if type(module).__name__ in ("Block", "BiBlock"):
                fully_shard(module)
        fully_shard(model)
        return model
    raise ValueError(f"trainer.strategy={strategy!r}: needs 'ddp' or 'fsdp'")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def full_state_dict(model: torch.nn.Module, strategy: str) -> dict:
    """A full, CPU state dict on every rank's call (FSDP gathers shards; DDP just unwraps)."""
    if strategy == "fsdp" and dist.is_available() and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
