"""Plots the tasks write into a run directory: confusion matrices (species, probes), accuracy
against length (synthetic extrapolation) and spectrograms (audio samples).

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so no display is needed and
no global backend is switched for the caller. The training-curve plot every run writes is the
trainer's: seqlab.training.curves.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchaudio
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..data.audio_io import to_mono


def _figure(figsize: tuple[float, float], dpi: int | None = None) -> Figure:
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, **kwargs)
    return path


def plot_confusion_matrix(cm: np.ndarray, labels: list[str], path: str | Path,
                          title: str = "confusion matrix") -> Path:
    """Row-normalised confusion matrix (rows: true class) with counts in the cells."""
    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = _figure((1.2 * len(labels) + 2.5, 1.1 * len(labels) + 2))
    ax = fig.add_subplot(1, 1, 1)
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
    return _save(fig, path, dpi=110)


def plot_extrapolation(lengths: list[int], accs: list[float], train_len: int, path: str | Path,
                       title: str) -> Path:
    """Accuracy against sequence length (log x), the training length marked."""
    fig = _figure((5.5, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(lengths, accs, marker="o")
    ax.axvline(train_len, color="grey", ls="--", lw=1, label=f"training length {train_len}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("accuracy (answer positions)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    return _save(fig, path, dpi=110)


def save_spectrogram_png(wave, rate: int, path: str | Path, title: str | None = None) -> Path:
    """Plot a log-magnitude spectrogram (dB) of a waveform to a PNG.

    Args:
        wave: float (channels, samples) or (samples,); channels are averaged.
        rate: sample rate in Hz, for the axes.
        path: destination .png; parent folders are created.
        title: optional plot title.
    Returns:
        The destination Path.
    """
    mono = to_mono(torch.as_tensor(wave).to(torch.float32))[0]
    # ~32 ms windows with 75% overlap: resolves pitch harmonics of speech at any rate.
    n_fft = max(16, 1 << int(round(np.log2(0.032 * rate))))
    if mono.numel() < n_fft:
        mono = torch.nn.functional.pad(mono, (0, n_fft - mono.numel()))
    spec = torchaudio.transforms.Spectrogram(n_fft=n_fft, hop_length=n_fft // 4, power=2.0)(mono)
    db = 10.0 * torch.log10(spec + 1e-10)  # (n_fft // 2 + 1, frames)
    fig = _figure((8, 3.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    duration = mono.numel() / rate
    im = ax.imshow(db.numpy(), origin="lower", aspect="auto", cmap="magma",
                   extent=(0.0, duration, 0.0, rate / 2.0), vmin=float(db.max()) - 80.0)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("frequency (Hz)")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, label="power (dB)")
    fig.tight_layout()
    return _save(fig, path, format="png")


__all__ = ["plot_confusion_matrix", "plot_extrapolation", "save_spectrogram_png"]
