"""A tiny training run for the distributed tests, launched by torchrun (or plain python).

usage: python dist_toy.py RUN_DIR MICRO_BATCH GRAD_ACCUM MAX_STEPS [CRASH_AT_STEP]
"""
import sys
from types import SimpleNamespace

import torch

from seqlab.training.trainer import Task, Trainer, TrainerConfig


class Toy(Task):
    def __init__(self, crash_at_step=None):
        self.crash_at_step = crash_at_step

    def build_model(self, device):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(),
                                   torch.nn.Linear(16, 1)).to(device)

    def train_batch(self, indices, device):
        if self.crash_at_step is not None and indices[0] >= self.crash_at_step * 8:
            raise SystemExit(3)
        x = torch.stack([torch.randn(4, generator=torch.Generator().manual_seed(i))
                         for i in indices])
        return SimpleNamespace(x=x, y=x.sum(-1, keepdim=True).sin())

    def loss(self, model, batch):
        loss = ((model(batch.x) - batch.y) ** 2).mean()
        return loss, {"loss": loss.item()}


if __name__ == "__main__":
    run_dir, micro, accum, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    crash = int(sys.argv[5]) if len(sys.argv) > 5 else None
    cfg = TrainerConfig(max_steps=steps, micro_batch_size=micro, grad_accum=accum, lr=1e-2,
                        warmup_steps=1, log_every=1, eval_every=0, ckpt_every=2, device="cpu",
                        progress=False, seed=1)
    Trainer(cfg, run_dir).fit(Toy(crash))
