"""Plots written into a run directory (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_training_curves(records: list[dict], path: str | Path) -> Path | None:
    """Train loss (and every eval metric) against step. Returns the PNG path, or None if empty."""
    train = [r for r in records if r.get("split") == "train" and "loss" in r]
    evals = [r for r in records if r.get("split") == "eval"]
    if not train and not evals:
        return None
    eval_keys = sorted({k for r in evals for k, v in r.items()
                        if k not in ("step", "split") and isinstance(v, (int, float))})
    ncols = 1 + any(not ("loss" in k or "nll" in k or "bits" in k) for k in eval_keys)
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 3.8), squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    for k in eval_keys:
        if "loss" in k or "nll" in k or "bits" in k:
            pts = [(r["step"], r[k]) for r in evals if k in r]
            ax.plot(*zip(*pts), marker="o", label=f"eval {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    other = [k for k in eval_keys if not ("loss" in k or "nll" in k or "bits" in k)]
    if other:
        ax2 = axes[0, 1]
        for k in other:
            pts = [(r["step"], r[k]) for r in evals if k in r]
            ax2.plot(*zip(*pts), marker="o", label=k)
        ax2.set_xlabel("step")
        ax2.set_title("evaluation")
        ax2.grid(alpha=0.3)
        ax2.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion_matrix(cm: np.ndarray, labels: list[str], path: str | Path,
                          title: str = "confusion matrix") -> Path:
    """Row-normalised confusion matrix (rows: true class) with counts in the cells."""
    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.1 * len(labels) + 2))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
