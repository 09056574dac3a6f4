"""Progress reporting that suits where the output goes.

On a terminal, a tqdm bar. Anywhere else (a log file, a pipe, CI), a bar's carriage-return
redraws pile up as thousands of partial lines, so :func:`progress` prints one plain line per
reporting interval instead: every ``every`` units when given (the trainer passes its
``log_every``), else at each tenth of the total, and at the end.

    with progress(total=400, desc="train", unit="step", every=10) as bar:
        for step in ...:
            bar.update(1)
            bar.set_postfix({"loss": 0.31})
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, TextIO


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


class LineProgress:
    """tqdm's update / set_postfix / close interface, writing one line per interval."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0,
                 every: int | None = None, stream: TextIO | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self.stream = stream if stream is not None else sys.stderr
        if every is None:
            every = max(1, (total or 10) // 10)
        self.every = max(1, int(every))
        self.postfix: dict = {}
        self._t0 = time.time()
        self._n0 = initial
        self._last_line = initial
        self._closed = False

    def update(self, n: int = 1) -> None:
        before = self.n
        self.n += n
        if self.n // self.every > before // self.every or (self.total and self.n >= self.total
                                                          and before < self.total):
            self._line()

    def set_postfix(self, postfix: dict | None = None, refresh: bool = True, **kwargs) -> None:
        self.postfix = {**(postfix or {}), **kwargs}

    def _line(self) -> None:
        done = self.n - self._n0
        dt = max(time.time() - self._t0, 1e-9)
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{done / dt:.3g} {self.unit}/s")
        if self.total and done:
            parts.append(f"eta {_clock((self.total - self.n) * dt / done)}")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        print(", ".join(parts), file=self.stream, flush=True)
        self._last_line = self.n

    def close(self) -> None:
        if not self._closed and self.n != self._last_line:
            self._line()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _Silent:
    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress(total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True,
             initial: int = 0, every: int | None = None, stream: TextIO | None = None):
    """A progress reporter: a tqdm bar on a terminal, plain lines elsewhere, nothing if disabled.

    ``every``: units between plain lines (default: a tenth of ``total``). Use as a context
    manager or call ``close()``.
    """
    if not enabled:
        return _Silent()
    stream = stream if stream is not None else sys.stderr
    if _is_terminal(stream):
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True,
                    file=stream)
    return LineProgress(total, desc, unit, initial=initial, every=every, stream=stream)


def track(iterable: Iterable, total: int | None = None, desc: str = "", unit: str = "it",
          enabled: bool = True, every: int | None = None, stream: TextIO | None = None):
    """Iterate ``iterable`` while reporting progress as :func:`progress` does."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with progress(total=total, desc=desc, unit=unit, enabled=enabled, every=every,
                  stream=stream) as bar:
        for item in iterable:
            yield item
            bar.update(1)


__all__ = ["progress", "track", "LineProgress"]
