"""The training-curve plot every run writes (plots/training.png), from its metrics.jsonl
records. Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so no display is
needed and no global backend is switched for the caller. The plots of particular tasks
(confusion matrices, extrapolation, spectrograms) are in seqlab.tasks.plots."""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


class Curve(NamedTuple):
    label: str
    steps: list
    values: list


class Panel(NamedTuple):
    """One axis of the training plot: every curve on it is in the unit ``ylabel`` names;
    ``refs`` are (label, value) horizontal lines: final test figures and baselines."""

    title: str
    ylabel: str
    curves: list[Curve]
    refs: list = []


def _unit(key: str) -> str | None:
    """"bits" or "nats" for a cross-entropy metric, None for any other. seqlab's tasks log
    cross-entropy in nats as ``loss`` / ``val_loss`` / ``*nll*`` and in bits as ``bits_per_*``."""
    if "bits" in key:
        return "bits"
    if "loss" in key or "nll" in key:
        return "nats"
    return None


def _series(records: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def training_panels(records: list[dict]) -> list[Panel]:
    """The panels of :func:`plot_training_curves` for metrics.jsonl records.

    Cross-entropy curves (train and eval) share one axis in one unit: bits when any metric
    is in bits, the nats curves then divided by ln 2 (and dropped when the run also logs the
    same values in bits, as the audio and DNA tasks do), else nats. Other eval metrics
    (accuracy, F1: fractions) get a second panel.
    """
    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    # Final figures without a step axis: the model's test result and the baselines beside it
    # (records of split "test" / "baseline"), drawn as horizontal lines on the panel of their
    # unit.
    refs = [(f"{r['split']} {k}", v) for r in records if r.get("split") in ("test", "baseline")
            for k, v in r.items() if k not in ("step", "split") and isinstance(v, (int, float))
            and not isinstance(v, bool)]

    def numeric_keys(rs):
        return sorted({k for r in rs for k, v in r.items()
                       if k not in ("step", "split") and isinstance(v, (int, float))})

    ce = [(split, k, _unit(k)) for split, rs in (("train", train), ("eval", evals))
          for k in numeric_keys(rs) if _unit(k)]
    in_bits = any(unit == "bits" for _, _, unit in ce)
    panels = []
    curves = []
    for split, k, unit in ce:
        steps, values = _series(train if split == "train" else evals, k)
        if in_bits and unit == "nats":
            values = [v / math.log(2) for v in values]
            twins = [_series(train if s == "train" else evals, k2) for s, k2, u in ce
                     if s == split and u == "bits"]
            if any(t[0] == steps and np.allclose(t[1], values, rtol=1e-6) for t in twins):
                continue
            label = f"{split} {k} / ln 2"
        else:
            label = f"{split} {k}"
        curves.append(Curve(label, steps, values))
    ce_refs = [(label, v / math.log(2) if in_bits and _unit(label) == "nats" else v)
               for label, v in refs if _unit(label)]
    if curves or ce_refs:
        unit = "bits" if in_bits or any(_unit(lb) == "bits" for lb, _ in ce_refs) else "nats"
        panels.append(Panel("cross-entropy", f"cross-entropy ({unit})", curves, ce_refs))
    other = [Curve(f"eval {k}", *_series(evals, k)) for k in numeric_keys(evals) if not _unit(k)]
    other_refs = [(label, v) for label, v in refs if not _unit(label)]
    if other or other_refs:
        panels.append(Panel("evaluation", "fraction", other, other_refs))
    return panels


def plot_training_curves(records: list[dict], path: str | Path) -> Path | None:
    """Cross-entropy (train and eval, one unit) and other eval metrics against step, one
    panel per unit (:func:`training_panels`). Returns the PNG path, or None if empty."""
    panels = training_panels(records)
    if not panels:
        return None
    fig = Figure(figsize=(5.5 * len(panels), 3.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for c in panel.curves:
            # Train is logged every few steps (a line); eval at a few steps (points), and a
            # curve of one point needs a marker to show at all.
            dense = c.label.startswith("train") and len(c.steps) > 1
            ax.plot(c.steps, c.values, label=c.label, marker=None if dense else "o")
        for label, value in panel.refs:
            ax.axhline(value, linestyle="--" if label.startswith("baseline") else ":",
                       color="0.4" if label.startswith("baseline") else "k", linewidth=1.2,
                       label=f"{label} {value:.4g}")
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        ax.set_title(panel.title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


__all__ = ["plot_training_curves", "training_panels"]
