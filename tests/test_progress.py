"""Progress reports: a bar on a terminal, one plain line per interval anywhere else."""
import io
from types import SimpleNamespace

import torch

from seqlab.progress import LineProgress, progress, track
from seqlab.training.trainer import Task, Trainer, TrainerConfig


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_when_the_output_is_not_a_terminal():
    out = io.StringIO()
    with progress(total=400, desc="train", unit="step", every=10, stream=out) as bar:
        assert isinstance(bar, LineProgress)
        for i in range(400):
            bar.set_postfix({"loss": f"{1 / (i + 1):.3g}"})
            bar.update(1)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 40
    assert lines[-1].startswith("train: 400/400 step (100%)") and "loss=0.0025" in lines[-1]


def test_the_last_partial_interval_gets_its_line_and_default_interval_is_a_tenth():
    out = io.StringIO()
    with progress(total=25, desc="x", every=10, stream=out) as bar:
        bar.update(25)
    assert len(out.getvalue().splitlines()) == 1  # crossed 10 and 20 in one update: one line
    out = io.StringIO()
    bar = progress(total=23, desc="x", every=10, stream=out)
    for _ in range(23):
        bar.update(1)
    bar.close()
    assert [ln.split(",")[0] for ln in out.getvalue().splitlines()] == [
        "x: 10/23 it (43%)", "x: 20/23 it (87%)", "x: 23/23 it (100%)"]
    out = io.StringIO()
    assert sum(1 for _ in track(range(50), desc="y", stream=out)) == 50
    assert len(out.getvalue().splitlines()) == 10


def test_a_terminal_gets_the_bar_and_disabled_prints_nothing():
    from tqdm.auto import tqdm
    bar = progress(total=5, stream=_Tty())
    assert isinstance(bar, tqdm)
    bar.close()
    out = io.StringIO()
    with progress(total=5, enabled=False, stream=out) as bar:
        bar.update(5)
    assert out.getvalue() == ""


class _Toy(Task):
    def build_model(self, device):
        return torch.nn.Linear(2, 1)

    def train_batch(self, indices, device):
        x = torch.randn(len(indices), 2, generator=torch.Generator().manual_seed(indices[0]))
        return SimpleNamespace(x=x, y=x.sum(-1, keepdim=True))

    def loss(self, model, batch):
        loss = ((model(batch.x) - batch.y) ** 2).mean()
        return loss, {"loss": loss.item()}


def test_training_log_holds_one_line_per_logging_interval(tmp_path, capsys):
    cfg = TrainerConfig(max_steps=40, micro_batch_size=4, log_every=5, eval_every=0,
                        ckpt_every=0, device="cpu", progress=True, warmup_steps=1)
    Trainer(cfg, tmp_path / "run").fit(_Toy())
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("train:")]
    assert len(lines) == 8 and "loss=" in lines[-1] and "40/40" in lines[-1]
