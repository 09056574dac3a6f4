"""Job `synthetic`: train a causal MambaLM on selective copying or induction heads, then
measure accuracy at the training length and far beyond it (seqlab.tasks.synthetic).

``data.curriculum`` ([[from_step, seq_len], ...], default null) trains at shorter lengths first
(:class:`seqlab.data.synthetic.LengthCurriculum`); evaluation always runs at ``data.seq_len``.
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ..data.synthetic import LengthCurriculum, SyntheticTask, make_curriculum, make_task
from ..errors import ConfigError
from ..tasks.common import model_config
from ..tasks.synthetic import SyntheticLMTask
from ..training import distributed as D
from .common import fit, print_summary, trainer_config


def generator_from_config(cfg: DictConfig) -> SyntheticTask:
    """The training-stream generator named by ``data.task`` with the remaining data keys."""
    d = OmegaConf.to_container(cfg.data, resolve=True)
    name = d.pop("task")
    d.pop("eval_seed", None)
    d.pop("curriculum", None)
    try:
        return make_task(name, **d)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid `data` config for the synthetic job: {exc}") from exc


def curriculum_from_config(cfg: DictConfig, gen: SyntheticTask) -> LengthCurriculum | None:
    """``data.curriculum`` validated against the full-length generator (None when unset)."""
    spec = cfg.data.get("curriculum", None)
    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    try:
        return make_curriculum(spec, gen)
    except ValueError as exc:
        raise ConfigError(f"invalid `data` config for the synthetic job: {exc}") from exc


def synthetic_task(cfg: DictConfig, world_size: int = 1) -> SyntheticLMTask:
    """The task of a composed synthetic recipe, for ``world_size`` processes."""
    gen = generator_from_config(cfg)
    t = trainer_config(cfg)  # the trainer's own defaults for keys the recipe leaves out
    e = cfg.eval
    return SyntheticLMTask(
        gen, model_config(cfg), cfg.data.eval_seed,
        samples_per_step=t.micro_batch_size * t.grad_accum * int(world_size),
        curriculum=curriculum_from_config(cfg, gen), eval_samples=e.n_samples,
        eval_batch_size=e.batch_size, extrapolate=list(e.extrapolate),
        extrapolate_samples=e.extrapolate_samples, chunk=e.chunk, precision=t.precision,
        data_spec=OmegaConf.to_container(cfg.data, resolve=True))


def train_synthetic(cfg: DictConfig) -> dict:
    # fit() joins the process group before it builds the task, so the world size is known.
    summary, trainer = fit(cfg, lambda c: synthetic_task(c, world_size=D.world_size()))
    if trainer.dist.is_main:
        print_summary(f"synthetic {cfg.data.task}", summary, trainer.run)
        for key in ("training_plot", "extrapolation_plot"):
            if key in summary:
                print(f"plot: {summary[key]}")
    return summary
