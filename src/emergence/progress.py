"""A one-line progress display for long work: done/total, rate, ETA, plus a few live values.

On a terminal the line is redrawn in place; otherwise (logs, CI, pipes) a full line is
printed at most every `every_s` seconds, so a log stays readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """`Progress(total, "tokens")`; call `update(n, loss=...)` as work is done, `close()` at the end."""

    def __init__(self, total: float | None, unit: str, *, desc: str = "", stream: TextIO | None = None,
                 every_s: float = 10.0, enabled: bool = True) -> None:
        self.total, self.unit, self.desc = total, unit, desc
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s = 0.2 if self.tty else every_s
        self.done = 0.0
        self.start = self._last = time.perf_counter()
        self.values: dict[str, str] = {}

    def update(self, n: float = 1, **values: object) -> None:
        self.done += n
        for k, v in values.items():
            self.values[k] = f"{v:.4f}" if isinstance(v, float) else str(v)
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.every_s:
            self._last = now
            self._write(self.line())

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [self.desc] if self.desc else []
        if self.total:
            parts.append(f"{human(self.done)}/{human(self.total)} {self.unit} ({100 * self.done / self.total:.0f}%)")
        else:
            parts.append(f"{human(self.done)} {self.unit}")
        parts.append(f"{human(rate)} {self.unit}/s")
        parts += [f"{k} {v}" for k, v in self.values.items()]
        parts.append(f"elapsed {duration(elapsed)}")
        if self.total and rate > 0:
            parts.append(f"ETA {duration((self.total - self.done) / rate)}")
        return " | ".join(parts)

    def _write(self, line: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._write(self.line())
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()
