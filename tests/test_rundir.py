"""Run directories: one run per directory, a status that tells the truth, resume that never
makes things worse, checkpoints that are verified and confined to their folder."""
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch

from seqlab.errors import CheckpointError, RunDirError
from seqlab.training import rundir as R
from seqlab.training.checkpoint import verify_checkpoint
from seqlab.training.rundir import RunDir, read_status
from seqlab.training.trainer import Task, Trainer, TrainerConfig


class Toy(Task):
    """Regression whose sample i is a pure function of i; ``on_step`` sees each batch call."""

    def __init__(self, on_batch=None, on_finish=None, width=8):
        self.on_batch, self.on_finish, self.width = on_batch, on_finish, width
        self.calls = 0

    def build_model(self, device):
        return torch.nn.Sequential(torch.nn.Linear(4, self.width), torch.nn.Tanh(),
                                   torch.nn.Linear(self.width, 1)).to(device)

    def checkpoint_extra(self):
        return {"width": self.width}

    def train_batch(self, indices, device):
        self.calls += 1
        if self.on_batch:
            self.on_batch(self.calls)
        x = torch.stack([torch.randn(4, generator=torch.Generator().manual_seed(i))
                         for i in indices])
        return SimpleNamespace(x=x, y=x.sum(-1, keepdim=True).sin())

    def loss(self, model, batch):
        loss = ((model(batch.x) - batch.y) ** 2).mean()
        return loss, {"loss": loss.item()}

    def finish(self, model, run, device):
        if self.on_finish:
            self.on_finish(run)
        return {}


def _cfg(**kw):
    base = dict(max_steps=8, micro_batch_size=4, lr=1e-2, warmup_steps=1, log_every=2,
                eval_every=0, ckpt_every=2, keep_checkpoints=3, device="cpu", progress=False,
                seed=1)
    base.update(kw)
    return TrainerConfig(**base)


CONFIG = {"model": {"d_model": 8}, "data": {"window": 100}, "trainer": {"max_steps": 8}}


def _trainer(path, config=CONFIG, **kw):
    text = json.dumps(config) if config is not None else None
    return Trainer(_cfg(**kw), path, config_text=text, config=config)


def _snapshot(folder):
    """Every file's bytes and every folder's name under ``folder`` (the lock file aside)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.name == R.LOCK_NAME:
            continue
        out[str(p.relative_to(folder))] = p.read_bytes() if p.is_file() else None
    return out


# ============================================================================ one run per dir
def test_second_run_on_a_locked_directory_stops_at_once_naming_the_holder(tmp_path):
    holder = RunDir(tmp_path / "run").acquire()
    try:
        t0 = time.time()
        with pytest.raises(RunDirError, match=rf"in use by another seqlab run \(pid {os.getpid()}"):
            _trainer(tmp_path / "run").fit(Toy())
        assert time.time() - t0 < 5
        assert not (tmp_path / "run" / "status.json").exists()
        assert not (tmp_path / "run" / "config.yaml").exists()
    finally:
        holder.release()
    _trainer(tmp_path / "run").fit(Toy())  # free again once the holder let go
    assert read_status(tmp_path / "run")["status"] == "completed"


_HOLD = textwrap.dedent("""
    import sys, time
    from seqlab.training.rundir import RunDir
    run = RunDir(sys.argv[1]).acquire()
    run.begin("a: 1\\n", step=0)
    run.heartbeat(3, force=True)
    print("ready", flush=True)
    time.sleep(60)
""")


def test_killed_run_is_reported_interrupted_and_its_lock_taken_over(tmp_path, caplog):
    path = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(RunDirError, match=f"pid {proc.pid}"):
            RunDir(path).acquire()
        assert read_status(path)["status"] == "running"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    status = read_status(path)
    assert status["status"] == "interrupted" and status["step"] == 3
    assert "interrupted at step 3" in R.describe_status(path)
    with caplog.at_level("WARNING", logger="seqlab"):
        run = RunDir(path).acquire()
    run.release()
    assert f"pid {proc.pid}" in caplog.text and "taken over" in caplog.text


def test_status_has_heartbeat_while_running_and_completed_only_at_the_end(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "HEARTBEAT_SECONDS", 0.0)
    seen = []

    def look(call):
        seen.append(read_status(tmp_path / "run"))

    def at_finish(run):
        s = read_status(run.path)
        assert s["status"] == "running", "completed must wait for the final outputs"
        assert not (run.path / "summary.json").exists()

    _trainer(tmp_path / "run").fit(Toy(on_batch=look, on_finish=at_finish))
    running = [s for s in seen if s]
    assert all(s["status"] == "running" and s["pid"] == os.getpid() for s in running)
    steps = [s["step"] for s in running]
    assert steps == sorted(steps) and steps[-1] == 7 and len(set(steps)) == 8
    final = read_status(tmp_path / "run")
    assert final["status"] == "completed" and final["step"] == 8
    assert (tmp_path / "run" / "summary.json").exists()


def test_failure_is_recorded_with_its_error(tmp_path):
    def boom(call):
        if call == 3:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        _trainer(tmp_path / "run").fit(Toy(on_batch=boom))
    s = read_status(tmp_path / "run")
    assert s["status"] == "failed" and "disk on fire" in s["error"] and s["step"] == 2


# ============================================================================ resume
def _corrupt(path, how):
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(path.stat().st_size))
    elif how == "missing":
        path.unlink()


@pytest.mark.parametrize("victim, how", [("model.safetensors", "truncated"),
                                         ("model.safetensors", "garbage"),
                                         ("optimizer.pt", "truncated"),
                                         ("trainer_state.json", "garbage"),
                                         ("config.json", "missing")])
def test_corrupt_newest_checkpoint_falls_back_to_the_newest_intact(tmp_path, caplog, victim, how):
    path = tmp_path / "run"
    _trainer(path, max_steps=6).fit(Toy())
    ckpts = RunDir(path).checkpoint_dirs()
    assert [c.name for c in ckpts] == ["step_0000002", "step_0000004", "step_0000006"]
    _corrupt(ckpts[-1] / victim, how)
    with pytest.raises(CheckpointError, match=victim):
        verify_checkpoint(ckpts[-1])
    with caplog.at_level("WARNING", logger="seqlab"):
        task = Toy()
        _trainer(path, max_steps=8).fit(task)
    assert "step_0000006" in caplog.text and victim in caplog.text
    assert "resuming from step_0000004" in caplog.text
    assert task.calls == 4, "steps 4..7 redone from the intact checkpoint"
    assert read_status(path)["status"] == "completed"


def test_no_intact_checkpoint_stops_and_changes_nothing(tmp_path):
    path = tmp_path / "run"
    _trainer(path, max_steps=4).fit(Toy())
    for ckpt in RunDir(path).checkpoint_dirs():
        _corrupt(ckpt / "model.safetensors", "truncated")
    before = _snapshot(path)
    with pytest.raises(RunDirError) as err:
        _trainer(path, max_steps=8).fit(Toy())
    msg = str(err.value)
    assert "no intact checkpoint" in msg and "step_0000002" in msg and "step_0000004" in msg
    assert _snapshot(path) == before


def test_resume_with_other_settings_is_refused_listing_the_keys(tmp_path):
    path = tmp_path / "run"
    _trainer(path, max_steps=4).fit(Toy())
    before = _snapshot(path)
    changed = {"model": {"d_model": 16}, "data": {"window": 200}, "trainer": {"max_steps": 8}}
    with pytest.raises(RunDirError) as err:
        _trainer(path, config=changed, max_steps=8).fit(Toy(width=16))
    msg = str(err.value)
    assert "model.d_model: 8 -> 16" in msg and "data.window: 100 -> 200" in msg
    assert "trainer.max_steps" not in msg.split("Keys that may change")[0]
    assert "choose another run_dir" in msg
    assert _snapshot(path) == before


def test_resume_accepts_a_longer_schedule(tmp_path):
    path = tmp_path / "run"
    _trainer(path, max_steps=4).fit(Toy())
    longer = {**CONFIG, "trainer": {"max_steps": 8}}
    task = Toy()
    summary = _trainer(path, config=longer, max_steps=8).fit(task)
    assert summary["step"] == 8 and task.calls == 4
    assert json.loads((path / "config.yaml").read_text()) == longer


def test_resume_false_on_a_run_with_checkpoints_is_refused(tmp_path):
    path = tmp_path / "run"
    _trainer(path, max_steps=2).fit(Toy())
    before = _snapshot(path)
    with pytest.raises(RunDirError, match="resume=false would overwrite"):
        _trainer(path, max_steps=2).fit(Toy(), resume=False)
    assert _snapshot(path) == before


def test_a_start_that_fails_leaves_a_new_directory_uncreated(tmp_path):
    class Broken(Toy):
        def build_model(self, device):
            raise ValueError("bad model setting")

    with pytest.raises(ValueError):
        _trainer(tmp_path / "new").fit(Broken())
    assert not (tmp_path / "new").exists()


def test_every_file_a_run_writes_has_the_same_mode(tmp_path):
    old = os.umask(0o022)
    try:
        _trainer(tmp_path / "run", max_steps=2).fit(Toy())
    finally:
        os.umask(old)
    modes = {}
    for p in (tmp_path / "run").rglob("*"):
        if p.name == R.LOCK_NAME:
            continue
        kind = "dir" if p.is_dir() else "file"
        modes.setdefault(kind, set()).add(stat.S_IMODE(p.stat().st_mode))
    assert modes == {"dir": {0o755}, "file": {0o644}}


def test_last_partial_logging_window_is_logged(tmp_path, monkeypatch):
    import seqlab.training.trainer as T
    clock = iter(range(0, 10_000, 7))  # each call advances the clock by 7 s
    monkeypatch.setattr(T.time, "time", lambda: float(next(clock)))
    summary = _trainer(tmp_path / "run", max_steps=100, log_every=4,
                       max_minutes=0.5).fit(Toy())
    assert summary["stopped_early"]
    train = [r for r in RunDir(tmp_path / "run").read_metrics() if r["split"] == "train"]
    assert train[-1]["step"] == summary["step"]
    assert summary["step"] % 4 != 0, "the budget must have cut a window short for this test"
