"""The one training loop of seqlab: every task (DNA, audio, synthetic, and the synthetic
benchmark) trains through :class:`Trainer`.

A task is a :class:`Task`: it builds the model, turns global sample indices into a batch,
computes the loss and evaluates. The trainer owns everything else: optimizer and schedule,
mixed precision, gradient accumulation, torch.distributed (DDP / FSDP2 under torchrun),
metrics, progress bar, checkpoints (seqlab.training.checkpoint's one writer) and resume.

Determinism and resume: the samples of optimizer step ``s`` are a pure function of
(seed, s): micro-batch ``m`` on rank ``r`` holds the global indices
``((s * grad_accum + m) * world_size + r) * micro_batch_size + i``. A run killed after its
checkpoint at step ``s`` resumes at ``s`` and sees exactly the batches it would have seen,
also on another world size with the same global batch (world_size * grad_accum constant).
Dropout and masking RNG is reseeded from (seed, step, rank) at every step for the same reason.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import CheckpointError, ConfigError, RunDirError
from ..model.backbone import param_groups
from ..progress import progress
from ..utils import atomic_write_json, atomic_write_text, autocast, cosine_lr, resolve_device
from . import distributed as D
from .checkpoint import (OPTIMIZER_NAME, TRAINER_STATE_NAME, describe_model, load_weights,
                         write_checkpoint)
from .cuda_graphs import GraphedForward
from .curves import plot_training_curves
from .rundir import RunDir

log = logging.getLogger(__name__)


@dataclass
class TrainerConfig:
    max_steps: int = 200
    micro_batch_size: int = 16  # per rank, per accumulation step
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1  # not applied to A_log, D, biases, norms (_no_weight_decay flags)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 100  # 0 = only at the end
    ckpt_every: int = 100  # 0 = only at the end
    keep_checkpoints: int = 2
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "bf16" | "fp32"
    device: str = "auto"
    strategy: str = "ddp"  # under torchrun: "ddp" | "fsdp"
    seed: int = 0
    max_minutes: float = 0.0  # wall-clock budget for training steps; 0 = none
    # Replay the model's forward and backward from CUDA graphs (one process, CUDA, fixed batch
    # shapes; seqlab.training.cuda_graphs): removes the kernel-launch cost that bounds small models.
    cuda_graph: bool = False
    progress: bool = True
    # The trainer group the settings came from (recipes/trainer/<profile>.yaml). A "gpu" profile
    # on a machine without CUDA runs on the CPU and says so; device=cuda there is an error.
    profile: str = "cpu"


class Task:
    """What a task provides to the trainer: build_model, train_batch and loss always; the
    others when it has something to say."""

    def build_model(self, device: torch.device) -> torch.nn.Module:
        raise NotImplementedError

    def checkpoint_extra(self) -> dict:
        """JSON-able facts about the model that the weights do not hold (class names, window,
        audio settings), stored under config.json's "extra" in every checkpoint."""
        return {}

    def train_batch(self, indices: list[int], device: torch.device):
        """The batch holding global sample ``indices`` (deterministic in the indices)."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, step: int, device: torch.device) -> dict[str, float]:
        """Held-out metrics; called on rank 0 with the unwrapped model in eval mode."""
        return {}

    def finish(self, model: torch.nn.Module, run: "RunDir", device: torch.device) -> dict[str, Any]:
        """Final evaluation, plots and summary on rank 0; returns the summary.

        Before the call the trainer sets ``self.samples_seen`` (global sample indices
        0 .. samples_seen - 1 were trained on, see train_batch) and ``self.step``; records
        the task logs with ``run.log({"split": "test" | "baseline", ...})`` appear as
        reference lines in the training plot."""
        return {}


# ----------------------------------------------------------------------------- optimizer
def lr_at(step: int, cfg: TrainerConfig) -> float:
    """Linear warm-up then cosine decay to lr * min_lr_ratio at max_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    return cosine_lr(cfg.lr, cfg.min_lr_ratio, (step - cfg.warmup_steps) / span)


# ----------------------------------------------------------------------------- trainer
class Trainer:
    """Runs a :class:`Task` in a run directory (seqlab.training.rundir).

    ``config_text`` is written as the run's config.yaml once the run starts; ``config`` (the
    same resolved config as a dict) is compared with the config of a run being resumed, so a
    changed model or data setting is refused before anything is touched. ``lr_schedule``
    (step, seconds since training began) -> learning rate replaces :func:`lr_at` (the
    synthetic benchmark decays by wall-clock progress).
    """

    def __init__(self, cfg: TrainerConfig, run: RunDir | str | os.PathLike,
                 config_text: str | None = None, config: dict | None = None,
                 lr_schedule: Callable[[int, float], float] | None = None):
        self.cfg = cfg
        self.lr_schedule = lr_schedule or (lambda step, seconds: lr_at(step, self.cfg))
        self.device = resolve_device(cfg.device, profile=cfg.profile)
        self.dist = D.init(self.device)
        self.run = run if isinstance(run, RunDir) else RunDir(run, is_main=self.dist.is_main)
        self.run.is_main = self.dist.is_main
        self.config_text = config_text
        self.config = config
        if cfg.precision == "auto":
            self.amp_dtype = torch.bfloat16 if self.device.type == "cuda" else None
        elif cfg.precision == "bf16":
            self.amp_dtype = torch.bfloat16
        elif cfg.precision == "fp32":
            self.amp_dtype = None
        else:
            raise ConfigError(f"trainer.precision={cfg.precision!r}: needs auto, bf16 or fp32")
        self._meta: dict = {}  # config.json's description of the model, set by fit

    def autocast(self):
        # CUDA graphs are captured without autocast's weight-cast cache (torch's rule)
        return autocast(self.device, self.amp_dtype, cache_enabled=not self.cfg.cuda_graph)

    def _graphed(self, model):
        """The model as the training step calls it: itself, or its CUDA-graph stand-in."""
        if not self.cfg.cuda_graph:
            return model
        if self.device.type != "cuda" or self.dist.enabled:
            raise ConfigError(f"trainer.cuda_graph=true needs one process on a CUDA device; this "
                              f"run has device {self.device} and world size "
                              f"{self.dist.world_size}: set trainer.cuda_graph=false")
        return GraphedForward(model, self.amp_dtype)

    # -- checkpoints
    def save_checkpoint(self, model, opt, step: int, extra: dict) -> None:
        """Write checkpoints/step_NNNNNNN through seqlab.training.checkpoint's one writer
        (weights, config.json, optimizer state, trainer state, checksums.json; atomic), then
        point checkpoints/latest at it."""
        state = D.full_state_dict(model, self.cfg.strategy)
        opt_state = self._optimizer_state(model, opt)
        if not self.dist.is_main:
            return
        name = f"step_{step:07d}"
        write_checkpoint(self.run.ckpt_dir / name, state, self._meta, optimizer_state=opt_state,
                         trainer_state={"step": step, "world_size": self.dist.world_size,
                                        "trainer": asdict(self.cfg), **extra})
        atomic_write_text(self.run.ckpt_dir / "latest", name + "\n")
        kept = self.run.checkpoint_dirs()
        for old in kept[:-max(1, self.cfg.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)

    def _optimizer_state(self, model, opt):
        if self.cfg.strategy == "fsdp" and self.dist.enabled:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 get_optimizer_state_dict)
            return get_optimizer_state_dict(model, opt, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
        return opt.state_dict()

    def load_optimizer(self, path: Path, model, opt) -> dict:
        """Restore the optimizer state of checkpoint ``path``; returns its trainer state."""
        try:
            opt_state = torch.load(path / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
        except Exception as err:  # zip / unpickling errors carry no file name
            raise CheckpointError(f"{path / OPTIMIZER_NAME}: unreadable ({err})") from None
        try:
            if self.cfg.strategy == "fsdp" and self.dist.enabled:
                from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                     set_optimizer_state_dict)
                set_optimizer_state_dict(model, opt, opt_state, options=StateDictOptions(
                    full_state_dict=True))
            else:
                opt.load_state_dict(opt_state)
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{path / OPTIMIZER_NAME}: does not fit this model's "
                                  f"optimizer ({err})") from None
        return json.loads((path / TRAINER_STATE_NAME).read_text())

    def _resume_point(self, resume: bool) -> Path | None:
        """Rank 0 checks the run directory and picks the checkpoint; every rank gets its
        answer (or its refusal), so no rank waits on one that gave up."""
        found, error = None, None
        if self.dist.is_main:
            try:
                found = self.run.resume_point(self.config, resume)
            except RunDirError as err:
                error = str(err)
        found, error = D.broadcast_object((str(found) if found else None, error))
        if error:
            raise RunDirError(error)
        return Path(found) if found else None

    # -- main loop
    def fit(self, task: Task, resume: bool = True) -> dict:
        """Train ``task`` to ``max_steps`` (or the time budget), resuming the run directory's
        newest intact checkpoint; returns the summary. The directory is locked for the whole
        call; a start refused before training begins leaves it as it was."""
        cfg = self.cfg
        run = self.run
        run.acquire()
        try:
            torch.manual_seed(cfg.seed)
            ckpt = self._resume_point(resume)
            raw = task.build_model(self.device)
            # Described before wrapping: FSDP changes the module's class in place.
            self._meta = describe_model(raw, task.checkpoint_extra())
            start_step = 0
            if ckpt is not None:
                # Weights before wrapping, so DDP broadcasts / FSDP shards the loaded values.
                load_weights(raw, ckpt)
            model = D.wrap_model(raw, cfg.strategy, self.device, self.dist)
            opt_model = model if cfg.strategy == "fsdp" else raw
            opt = torch.optim.AdamW(param_groups(opt_model, cfg.weight_decay), lr=cfg.lr,
                                    betas=(cfg.beta1, cfg.beta2),
                                    fused=self.device.type == "cuda")
            if ckpt is not None:
                state = self.load_optimizer(ckpt, model, opt)
                start_step = int(state["step"])
            step_model = self._graphed(model)
        except BaseException:
            run.abandon()
            raise
        run.begin(self.config_text, step=start_step)
        try:
            if ckpt is not None:
                run.truncate_metrics(start_step)
                log.info("resumed from %s at step %d", ckpt, start_step)
            elif self.dist.is_main and run.metrics_path.exists():
                run.metrics_path.unlink()  # a fresh start: no records of an earlier attempt
            return self._loop(task, model, raw, opt, step_model, start_step)
        except BaseException as exc:
            run.fail(exc)
            raise
        finally:
            run.release()

    def _loop(self, task: Task, model, raw, opt, step_model, start_step: int) -> dict:
        cfg, run = self.cfg, self.run
        n_params = sum(p.numel() for p in raw.parameters())
        if self.dist.is_main:
            log.info("model: %.2fM parameters on %s (world size %d, precision %s)",
                     n_params / 1e6, self.device, self.dist.world_size,
                     self.amp_dtype or "fp32")
        t_start = time.time()
        step = start_step
        bar = progress(total=cfg.max_steps, initial=start_step, desc="train", unit="step",
                       every=cfg.log_every, enabled=cfg.progress and self.dist.is_main)
        window: dict[str, float] = {}
        window_n = 0
        tokens = 0
        t_window = time.time()
        stopped_early = False
        lr = self.lr_schedule(step, 0.0)

        def log_window() -> None:
            nonlocal window, window_n, tokens, t_window
            avg = D.all_reduce_mean({k: v / window_n for k, v in window.items()}, self.device)
            dt = time.time() - t_window
            run.log({"step": step, "split": "train", "lr": lr, **avg,
                     "tokens_per_s": tokens * self.dist.world_size / max(dt, 1e-9)})
            bar.set_postfix({k: f"{v:.4g}" for k, v in avg.items() if k in ("loss", "acc")})
            window, window_n, tokens, t_window = {}, 0, 0, time.time()

        with bar:
            while step < cfg.max_steps:
                elapsed = time.time() - t_start
                if cfg.max_minutes and elapsed / 60 > cfg.max_minutes:
                    stopped_early = True
                    log.info("time budget of %.1f min reached at step %d", cfg.max_minutes, step)
                    break
                lr = self.lr_schedule(step, elapsed)
                for g in opt.param_groups:
                    g["lr"] = lr
                torch.manual_seed(cfg.seed * 1_000_003 + step * 1_009 + self.dist.rank)
                model.train()
                metrics = self._train_step(task, model, opt, step, step_model)
                tokens += metrics.pop("_tokens", 0)
                for k, v in metrics.items():
                    window[k] = window.get(k, 0.0) + v
                window_n += 1
                step += 1
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    log_window()
                bar.update(1)
                run.heartbeat(step)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                    self._evaluate(task, model, step)
                if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.max_steps:
                    self.save_checkpoint(model, opt, step, {})
                    run.heartbeat(step, force=True)
            if window_n:  # the last, partial logging window (a time budget cut it short)
                log_window()
        self.save_checkpoint(model, opt, step, {"stopped_early": stopped_early})
        run.heartbeat(step, force=True)
        final = self._evaluate(task, model, step)
        summary: dict[str, Any] = {"step": step, "stopped_early": stopped_early,
                                   "train_minutes": (time.time() - t_start) / 60,
                                   "params_M": n_params / 1e6, **final}
        if self.dist.is_main:
            task.step = step
            task.samples_seen = step * cfg.micro_batch_size * cfg.grad_accum * self.dist.world_size
            summary.update(task.finish(D.unwrap(model), run, self.device) or {})
            curves = plot_training_curves(run.read_metrics(), run.plots_dir / "training.png")
            if curves:
                summary["training_plot"] = str(curves)
            atomic_write_json(run.path / "summary.json", summary)
        D.barrier()
        run.complete(step=step)
        return summary

    def _train_step(self, task: Task, model, opt, step: int, step_model) -> dict[str, float]:
        """One optimizer step; ``step_model`` is what the task's loss calls (``model`` itself,
        or its CUDA-graph stand-in with trainer.cuda_graph)."""
        cfg = self.cfg
        opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        tokens = 0
        for micro in range(cfg.grad_accum):
            base = ((step * cfg.grad_accum + micro) * self.dist.world_size + self.dist.rank)
            indices = [base * cfg.micro_batch_size + i for i in range(cfg.micro_batch_size)]
            batch = task.train_batch(indices, self.device)
            sync = micro == cfg.grad_accum - 1
            ctx = (model.no_sync() if (not sync and hasattr(model, "no_sync"))
                   else nullcontext())
            with ctx:
                with self.autocast():
                    loss, metrics = task.loss(step_model, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at step {step} "
                                             f"(micro-batch {micro}); lower trainer.lr or check "
                                             "the data")
                (loss / cfg.grad_accum).backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v) / cfg.grad_accum
            ids = getattr(batch, "ids", None)
            tokens += int(ids.numel()) if ids is not None else 0
        if cfg.grad_clip:
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            totals["grad_norm"] = float(gn)
        opt.step()
        totals["_tokens"] = tokens
        return totals

    def _evaluate(self, task: Task, model, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.cfg.strategy == "fsdp" and self.dist.enabled:
            # Sharded parameters: every rank takes part in the forward passes.
            model.eval()
            with torch.no_grad(), self.autocast():
                metrics = task.evaluate(model, step, self.device)
        elif self.dist.is_main:
            inner = D.unwrap(model)
            inner.eval()
            with torch.no_grad(), self.autocast():
                metrics = task.evaluate(inner, step, self.device)
        metrics = D.broadcast_object(metrics)
        if metrics:
            self.run.log({"step": step, "split": "eval", **metrics})
            if self.dist.is_main:
                log.info("eval @ %d: %s", step,
                         ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                   if isinstance(v, (int, float))))
        return metrics

