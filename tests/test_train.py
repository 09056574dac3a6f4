"""The training loop: determinism, atomic checkpoints, resume without lost or repeated steps."""
import json
from types import SimpleNamespace

import pytest
import torch

from seqlab.model import param_groups
from seqlab.training.rundir import RunDir
from seqlab.training.trainer import Task, Trainer, TrainerConfig, lr_at


class ToyTask(Task):
    """Linear regression whose sample i is a pure function of i; can crash at a chosen step."""

    def __init__(self, crash_at_call=None, noise=0.01):
        self.noise = noise
        self.calls = 0
        self.crash_at_call = crash_at_call
        self.seen = []

    def build_model(self, device):
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        return model.to(device)

    def checkpoint_extra(self):
        return {"toy": "linear regression"}

    def train_batch(self, indices, device):
        self.calls += 1
        if self.crash_at_call is not None and self.calls == self.crash_at_call:
            raise KeyboardInterrupt("simulated kill")
        self.seen.extend(indices)
        x = torch.stack([torch.randn(4, generator=torch.Generator().manual_seed(i))
                         for i in indices])
        y = x.sum(-1, keepdim=True).sin()
        return SimpleNamespace(x=x.to(device), y=y.to(device))

    def loss(self, model, batch):
        # Dropout-like noise from the global RNG: resume must reproduce it too.
        noise = 1 + self.noise * torch.randn(())
        loss = ((model(batch.x) - batch.y) ** 2).mean() * noise
        return loss, {"loss": loss.item()}

    def evaluate(self, model, step, device):
        return {"eval_loss": float(step)}


def _cfg(**kw):
    base = dict(max_steps=12, micro_batch_size=4, lr=1e-2, warmup_steps=2, log_every=2,
                eval_every=4, ckpt_every=3, device="cpu", progress=False, seed=3)
    base.update(kw)
    return TrainerConfig(**base)


def _weights(run_dir):
    from safetensors.torch import load_file
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    Trainer(_cfg(), full).fit(ToyTask())
    ref = _weights(full)

    part = tmp_path / "part"
    crashing = ToyTask(crash_at_call=8)  # dies during step 8 (after the checkpoint at step 6)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_cfg(), part).fit(crashing)
    status = json.loads((part / "status.json").read_text())
    assert status["status"] == "interrupted" and "simulated kill" in status["error"]
    assert not (part / "summary.json").exists()
    assert (part / "checkpoints" / "latest").read_text().strip() == "step_0000006"

    resumed = ToyTask()
    Trainer(_cfg(), part).fit(resumed)
    assert resumed.seen[0] == 6 * 4, "resume must start at the checkpointed step's samples"
    got = _weights(part)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)
    assert json.loads((part / "status.json").read_text())["status"] == "completed"
    steps = [r["step"] for r in RunDir(part).read_metrics() if r["split"] == "train"]
    assert steps == sorted(set(steps)) == [2, 4, 6, 8, 10, 12], "no lost or repeated log steps"


def test_grad_accumulation_equals_bigger_batch(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    Trainer(_cfg(micro_batch_size=8, grad_accum=1, max_steps=4), a).fit(ToyTask(noise=0))
    Trainer(_cfg(micro_batch_size=4, grad_accum=2, max_steps=4), b).fit(ToyTask(noise=0))
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        # Same samples and the same mean gradient: equal up to float summation order.
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_checkpoint_rotation_and_atomicity(tmp_path, monkeypatch):
    run = tmp_path / "r"
    Trainer(_cfg(keep_checkpoints=2), run).fit(ToyTask())
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == ["step_0000009", "step_0000012"]
    assert not list((run / "checkpoints").glob(".*tmp")), "no temporary directories left"

    import seqlab.training.checkpoint as C

    def broken_save(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(C, "save_file", broken_save)
    run2 = tmp_path / "r2"
    with pytest.raises(OSError):
        Trainer(_cfg(), run2).fit(ToyTask())
    assert not (run2 / "checkpoints" / "latest").exists()
    assert not [p for p in (run2 / "checkpoints").iterdir()], "no half-written checkpoint"
    assert json.loads((run2 / "status.json").read_text())["status"] == "failed"


def test_lr_schedule_and_param_groups():
    cfg = _cfg(lr=1.0, warmup_steps=4, max_steps=104, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.25)
    assert lr_at(3, cfg) == pytest.approx(1.0)
    assert lr_at(104, cfg) == pytest.approx(0.1)
    assert lr_at(54, cfg) == pytest.approx(0.55)
    m = torch.nn.Linear(3, 3)
    flagged = torch.nn.Parameter(torch.ones(3, 3))
    flagged._no_weight_decay = True
    m.register_parameter("A_log", flagged)
    decay, no_decay = param_groups(m, 0.1)
    assert {id(p) for p in decay["params"]} == {id(m.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(m.bias), id(flagged)}


def test_cuda_graph_needs_one_cuda_process(tmp_path):
    with pytest.raises(ValueError, match="trainer.cuda_graph=true needs one process on a CUDA"):
        Trainer(_cfg(cuda_graph=True), tmp_path / "run").fit(ToyTask())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_training_equals_eager(tmp_path):
    """trainer.cuda_graph=true replays the same computation: the same weights after 12 steps
    (with evaluations, checkpoints and eval-mode calls in between, which run eagerly)."""
    Trainer(_cfg(device="cuda"), tmp_path / "eager").fit(ToyTask())
    Trainer(_cfg(device="cuda", cuda_graph=True), tmp_path / "graph").fit(ToyTask())
    a, b = _weights(tmp_path / "eager"), _weights(tmp_path / "graph")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
