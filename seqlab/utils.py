"""Small shared helpers: devices, seeding, atomic file writes."""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU. For wall-clock timing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def length_mask(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """(batch, length) bool, True at the real positions t < lengths[b] of right-padded
    sequences; ``lengths`` (batch,) int. The one place seqlab builds a padding mask."""
    return torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]


def autocast(device: torch.device | str, dtype: torch.dtype | None = None,
             cache_enabled: bool = True):
    """Mixed precision in ``dtype`` on the device's type, or autocast explicitly off when
    ``dtype`` is None (so an enclosing autocast does not leak in). The one place seqlab opens
    an autocast context."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    if dtype is None:
        return torch.autocast(kind, enabled=False)
    return torch.autocast(kind, dtype=dtype, cache_enabled=cache_enabled)


def cosine_lr(lr: float, min_lr_ratio: float, progress: float) -> float:
    """Cosine decay from lr (progress 0) to lr * min_lr_ratio (progress >= 1)."""
    p = min(1.0, max(0.0, progress))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def resolve_device(device: str = "auto", profile: str | None = None) -> torch.device:
    """"auto" -> the local CUDA device when there is one, else the CPU.

    ``profile`` names the trainer group the setting came from: "gpu" with device "auto" on a
    machine without CUDA runs on the CPU and logs one line saying so."""
    if device == "auto":
        if torch.cuda.is_available():
            rank = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", rank % torch.cuda.device_count())
        if profile == "gpu":
            logging.getLogger("seqlab").warning(
                "trainer=gpu, but this machine has no CUDA device: running on the CPU "
                "(set trainer.device=cuda to make that an error)")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device={device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} was asked for but no CUDA device is available; "
                          "use device=cpu (or auto)")
    return dev


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (containers,
    CI runners) and shared among parallel pytest-xdist workers."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    return max(1, n // max(1, workers))


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 cpu.max, else v1 cfs quota), or None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def set_threads(n: int = 0) -> int:
    """Size torch's intra-op pool to ``n`` threads (0: :func:`usable_cores`) and return it.

    The compiled CPU scan (numba) follows torch's count, so the two pools never add up to more
    threads than cores. An explicit OMP_NUM_THREADS in the environment wins over the automatic
    choice, as it does for every OpenMP program.
    """
    if n <= 0:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        n = int(env) if env.isdigit() and int(env) > 0 else usable_cores()
    torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: str | os.PathLike, directory: bool | None = None) -> None:
    """Give ``path`` the mode a plain ``open()`` / ``mkdir()`` would (0o666 / 0o777 less the
    umask). Temporary files and folders are created private (0o600 / 0o700); everything a run
    publishes gets the same, ordinary mode."""
    path = Path(path)
    if directory is None:
        directory = path.is_dir()
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        publish_mode(tmp, directory=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def atomic_directory(final: str | os.PathLike):
    """Yield a temporary directory beside ``final``; on success it is renamed to ``final``.

    Before the rename every file in it and the folder itself are fsync'ed and given ordinary
    modes, and after it the parent is fsync'ed, so a crash never leaves a half-written
    directory under the final name. On any error the temporary directory is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        for p in sorted(tmp.rglob("*"), reverse=True):  # files before their folders
            if p.is_file():
                fsync_path(p)
                publish_mode(p, directory=False)
            elif p.is_dir():
                fsync_path(p)
                publish_mode(p, directory=True)
        fsync_path(tmp)
        publish_mode(tmp, directory=True)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def emit_report(header: str, table: str, rows: list[dict], json_path: str | None) -> None:
    """Print a benchmark's header and table; also write {"header", "rows"} as JSON if asked."""
    print(header)
    print(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=2)


def fmt_num(x, fmt: str = "{:,.0f}") -> str:
    """A table cell: '-' for None or NaN, else ``fmt`` applied."""
    return "-" if x is None or (isinstance(x, float) and x != x) else fmt.format(x)


def met_mark(row: dict) -> str:
    """'yes' / 'NO' for a benchmark row's ``meets_target``, '-' when it has no target."""
    return "-" if row["meets_target"] is None else ("yes" if row["meets_target"] else "NO")
