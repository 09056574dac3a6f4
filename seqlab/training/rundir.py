"""One run, one directory: the lock, the status and the resume point of a run directory.

Layout::

    <run_dir>/
        .lock            held (flock) by the one process working in the directory; names it
        config.yaml      the resolved config of the run
        status.json      running (with step and heartbeat) | completed | failed | interrupted
        metrics.jsonl    one JSON record per logging interval and evaluation
        summary.json     written last, only by a run that completed
        checkpoints/     step_NNNNNNN/ folders (seqlab.training.checkpoint), newest last
        plots/

A start goes through three phases, and only the last one writes:

1. :meth:`RunDir.acquire` takes an exclusive OS lock on ``.lock``. A second process on the same
   directory fails at once, naming the holder's pid. The OS drops the lock of a process that
   dies, even by ``kill -9``, so a dead run's lock is taken over (with a message).
2. :meth:`RunDir.resume_point` compares the new config with ``config.yaml`` and finds the newest
   checkpoint that passes verification, falling back past corrupt ones. It changes nothing:
   a start refused here (another config, no intact checkpoint) leaves the directory as it was.
3. :meth:`RunDir.begin` writes config.yaml and status "running". From then on the run keeps
   its status true: :meth:`heartbeat` while it works, :meth:`complete` after the final outputs
   exist, :meth:`fail` with the error otherwise.

A run that died without a word (kill -9, power loss) leaves status "running" behind;
:func:`read_status` reports it as "interrupted" because its process is gone.
"""
from __future__ import annotations

import fcntl
import fnmatch
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterable

from ..errors import CheckpointError, RunDirError
from ..utils import atomic_write_json, atomic_write_text, publish_mode
from .checkpoint import verify_checkpoint

log = logging.getLogger("seqlab")

LOCK_NAME = ".lock"
STATUS_NAME = "status.json"
CONFIG_NAME = "config.yaml"
HEARTBEAT_SECONDS = 10.0

# Keys whose value may change when a run is resumed: they bound, pace or report the run, or
# act only at its end; every other key shapes the model, the data or the optimisation, and
# a resumed run with another value would not be the run that was checkpointed.
RESUMABLE_KEYS = (
    "run_dir", "resume", "init_from", "cpu_threads", "threads",
    "trainer.max_steps", "trainer.max_minutes", "trainer.log_every", "trainer.eval_every",
    "trainer.ckpt_every", "trainer.keep_checkpoints", "trainer.progress", "trainer.device",
    "trainer.threads",
    "eval_batch_size", "eval.*", "post.*", "probe.*", "sample.*", "baseline.*",
    "data.eval_max_per_species", "data.test_max_per_species", "data.eval_stride",
    "data.eval_windows",
)


def _host() -> str:
    return socket.gethostname()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def read_status(path: str | os.PathLike) -> dict | None:
    """status.json of a run directory, with a dead run reported as it is.

    A status of "running" whose process is gone (same host, pid no longer alive) comes back as
    "interrupted" with ``"was": "running"``; None when the directory holds no status.
    """
    p = Path(path) / STATUS_NAME
    if not p.is_file():
        return None
    try:
        status = json.loads(p.read_text())
    except (json.JSONDecodeError, OSError) as err:
        return {"status": "unknown", "error": f"{p}: unreadable ({err})"}
    if status.get("status") == "running" and status.get("host") == _host():
        pid = status.get("pid")
        if isinstance(pid, int) and not _pid_alive(pid):
            status = {**status, "status": "interrupted", "was": "running"}
    return status


def describe_status(path: str | os.PathLike) -> str:
    """One line on the state of a run directory, for messages and ``seqlab status``."""
    s = read_status(path)
    if s is None:
        return f"{path}: no run here yet"
    step = f" at step {s['step']}" if s.get("step") is not None else ""
    if s["status"] == "interrupted" and s.get("was") == "running":
        beat = s.get("heartbeat") or s.get("time")
        return (f"{path}: interrupted{step}: its process (pid {s.get('pid')}) stopped without "
                f"finishing; last heartbeat {beat}")
    if s["status"] == "failed":
        return f"{path}: failed{step}: {s.get('error', 'no error recorded')}"
    if s["status"] == "running":
        return (f"{path}: running{step} (pid {s.get('pid')} on {s.get('host')}, "
                f"last heartbeat {s.get('heartbeat') or s.get('time')})")
    return f"{path}: {s['status']}{step} ({s.get('time')})"


def flatten(tree, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.update(flatten(v, key))
            else:
                out[key] = v
    return out


def config_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old value, new value) for every dotted key that differs; absent = '<unset>'."""
    a, b = flatten(old), flatten(new)
    missing = "<unset>"
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]


def resumable(key: str, patterns: Iterable[str] = RESUMABLE_KEYS) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


class RunDir:
    """A run directory (see the module docstring). Constructing one writes nothing."""

    def __init__(self, path: str | os.PathLike, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main
        self.ckpt_dir = self.path / "checkpoints"
        self.plots_dir = self.path / "plots"
        self._lock_fd: int | None = None
        self._lock_prior: bytes | None = None
        self._created = False
        self._begun = False
        self._last_beat = 0.0
        self._step: int | None = None

    # ------------------------------------------------------------------ paths and records
    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def status(self) -> dict | None:
        return read_status(self.path)

    def saved_config_text(self) -> str | None:
        p = self.path / CONFIG_NAME
        return p.read_text() if p.is_file() else None

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def log(self, record: dict) -> None:
        if self.is_main:
            new = not self.metrics_path.exists()
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record, default=float) + "\n")
                f.flush()
            if new:
                publish_mode(self.metrics_path)

    def truncate_metrics(self, step: int) -> None:
        """Drop records logged after ``step`` (a resumed run redoes those steps) and the final
        test and baseline records of an earlier end (the resumed run writes its own)."""
        if not self.is_main or not self.metrics_path.exists():
            return
        keep = [r for r in self.read_metrics() if r.get("step", 0) <= step
                and r.get("split") not in ("test", "baseline")]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in keep))

    # ------------------------------------------------------------------ phase 1: the lock
    def acquire(self) -> "RunDir":
        """Take the directory's lock, creating the directory if needed (main rank only).

        Raises RunDirError naming the holder when another live process has it.
        """
        if not self.is_main or self._lock_fd is not None:
            return self
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"run_dir {self.path} exists and is not a directory; choose another "
                              "run_dir")
        if not self.path.exists():
            try:
                self.path.mkdir(parents=True)
                self._created = True
            except FileExistsError:
                pass
            except OSError as err:
                raise RunDirError(f"cannot create run_dir {self.path}: {err.strerror}") from None
        lock = self.path / LOCK_NAME
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise RunDirError(f"cannot open the lock {lock}: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_fd(fd).decode(errors="replace").strip()
            os.close(fd)
            who = _holder_words(holder)
            raise RunDirError(f"run_dir {self.path} is in use by another seqlab run ({who}); "
                              "one run per directory: wait for it to finish, or choose another "
                              "run_dir") from None
        prior = _read_fd(fd)
        self._lock_fd, self._lock_prior = fd, prior
        status = read_status(self.path)
        if status and status.get("was") == "running":
            log.warning("%s: the previous run (pid %s) stopped without finishing at step %s "
                        "(last heartbeat %s); its lock is taken over", self.path,
                        status.get("pid"), status.get("step"),
                        status.get("heartbeat") or status.get("time"))
        _write_fd(fd, json.dumps({"pid": os.getpid(), "host": _host(), "since": _now()}).encode())
        return self

    def release(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def abandon(self) -> None:
        """Undo a start that failed before :meth:`begin`: restore the lock file as it was
        (remove the directory if this start created it and it holds nothing else), release."""
        if self._lock_fd is None:
            return
        if not self._begun:
            if self._created and {p.name for p in self.path.iterdir()} <= {LOCK_NAME}:
                self.release()
                shutil.rmtree(self.path, ignore_errors=True)
                return
            _write_fd(self._lock_fd, self._lock_prior or b"")
        self.release()

    # ------------------------------------------------------------------ phase 2: what to resume
    def resume_point(self, config: dict | None, resume: bool = True,
                     patterns: Iterable[str] = RESUMABLE_KEYS) -> Path | None:
        """The checkpoint to resume from (None: a fresh start), after checking that ``config``
        (the new resolved config as a dict; None skips the comparison) may continue this
        directory's run. Writes nothing.

        Raises RunDirError when the directory holds another run (different settings, or
        ``resume`` is off while checkpoints exist) or when no checkpoint is intact.
        """
        import yaml
        text = self.saved_config_text()
        checkpoints = self.checkpoint_dirs()
        if not checkpoints:
            # Nothing to continue (a new directory, or a run that stopped before its first
            # checkpoint): this start begins afresh and replaces config and metrics.
            return None
        if not resume:
            raise RunDirError(f"run_dir {self.path} already holds a run with checkpoints and "
                              "resume=false would overwrite it; choose another run_dir, or drop "
                              "resume=false to continue it")
        if text is not None and config is not None:
            try:
                old = yaml.safe_load(text) or {}
            except yaml.YAMLError as err:
                raise RunDirError(f"{self.path / CONFIG_NAME} is not readable YAML ({err}); "
                                  "choose another run_dir") from None
            changes = config_changes(old, config)
            fixed = [c for c in changes if not resumable(c[0], patterns)]
            if fixed:
                lines = "\n".join(f"  {k}: {_short(a)} -> {_short(b)}" for k, a, b in fixed[:20])
                more = f"\n  ... and {len(fixed) - 20} more" if len(fixed) > 20 else ""
                raise RunDirError(
                    f"run_dir {self.path} holds a run with other settings; these keys differ:\n"
                    f"{lines}{more}\nTo continue that run, use its settings (see "
                    f"{self.path / CONFIG_NAME}); to start a fresh run, choose another run_dir. "
                    "Keys that may change on resume: trainer.max_steps, trainer.max_minutes, "
                    "logging/eval/checkpoint intervals, trainer.device, eval.*, post.*, probe.*, "
                    "sample.*")
            for k, a, b in changes:
                log.info("resuming %s with %s: %s -> %s", self.path, k, _short(a), _short(b))
        problems = []
        for ckpt in reversed(checkpoints):
            try:
                verify_checkpoint(ckpt, require=("trainer_state.json",))
            except CheckpointError as err:
                problems.append(f"{ckpt.name}: {err}")
                continue
            if problems:
                log.warning("%s; resuming from %s instead", "; ".join(problems), ckpt.name)
            return ckpt
        raise RunDirError(f"run_dir {self.path}: no intact checkpoint to resume from:\n  "
                          + "\n  ".join(problems)
                          + "\nChoose another run_dir to start fresh (the files were left as "
                            "they are)")

    def checkpoint_dirs(self) -> list[Path]:
        """step_* checkpoint folders, oldest first (temporary and trash folders excluded)."""
        if not self.ckpt_dir.is_dir():
            return []
        return sorted(p for p in self.ckpt_dir.glob("step_*") if p.is_dir())

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint that passes verification (see :meth:`resume_point`)."""
        for ckpt in reversed(self.checkpoint_dirs()):
            try:
                verify_checkpoint(ckpt)
                return ckpt
            except CheckpointError as err:
                log.warning("%s: %s; trying an older checkpoint", self.path, err)
        return None

    # ------------------------------------------------------------------ phase 3: the run
    def begin(self, config_text: str | None, step: int = 0) -> None:
        """Publish the start: config.yaml (when given), status "running", and no summary of an
        earlier completion left beside a run that is not complete."""
        self._begun = True
        if not self.is_main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self.plots_dir.mkdir(exist_ok=True)
        publish_mode(self.plots_dir, directory=True)
        if config_text is not None:
            atomic_write_text(self.path / CONFIG_NAME, config_text)
        (self.path / "summary.json").unlink(missing_ok=True)
        self._write_status("running", step=step, started=_now())

    def heartbeat(self, step: int, force: bool = False) -> None:
        """Record the step and the time, at most every HEARTBEAT_SECONDS unless forced."""
        self._step = step
        if self.is_main and (force or time.time() - self._last_beat >= HEARTBEAT_SECONDS):
            self._write_status("running", step=step)

    def complete(self, **extra) -> None:
        self._write_status("completed", **extra)

    def fail(self, exc: BaseException, **extra) -> None:
        """Record how the run ended: "interrupted" for Ctrl-C / SIGTERM, else "failed"."""
        interrupted = isinstance(exc, KeyboardInterrupt) or (
            isinstance(exc, SystemExit) and exc.code in (130, 143))
        self._write_status("interrupted" if interrupted else "failed",
                           error=f"{type(exc).__name__}: {exc}", **extra)

    def set_status(self, status: str, **extra) -> None:
        self._write_status(status, **extra)

    def _write_status(self, status: str, **extra) -> None:
        if not self.is_main:
            return
        prev = {}
        p = self.path / STATUS_NAME
        if p.is_file():
            try:
                prev = json.loads(p.read_text())
            except (json.JSONDecodeError, OSError):
                prev = {}
        if "step" not in extra and self._step is not None:
            extra["step"] = self._step
        record = {"status": status, "time": _now(), "heartbeat": _now(), "pid": os.getpid(),
                  "host": _host(), "started": prev.get("started"), **extra}
        if status == "running":
            record.pop("error", None)
        atomic_write_json(p, record)
        self._last_beat = time.time()

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> "RunDir":
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self._begun:
            self.abandon()
            return False
        if exc is not None:
            self.fail(exc)
        self.release()
        return False


def _read_fd(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while True:
        b = os.read(fd, 65536)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def _write_fd(fd: int, data: bytes) -> None:
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, data)
    os.fsync(fd)


def _holder_words(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h.get('pid')} on {h.get('host')}, since {h.get('since')}"
    except (json.JSONDecodeError, AttributeError):
        return "holder unknown"


def _short(value, limit: int = 60) -> str:
    s = json.dumps(value, default=str) if not isinstance(value, str) else value
    return s if len(s) <= limit else s[:limit - 3] + "..."


__all__ = ["RunDir", "read_status", "describe_status", "config_changes", "RESUMABLE_KEYS"]
