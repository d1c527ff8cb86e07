"""Terminal progress: a one-line bar on a terminal, plain periodic lines otherwise.

On a terminal the bar is redrawn in place (carriage return) at most every `tty_every_s`; into a
file or a pipe (a log, `prismatic up`, CI) a plain line is written every `every_s` seconds, and
always for the last step, so logs stay short and readable.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(
        self,
        total_steps: int,
        tokens_per_step: int,
        name: str = "",
        stream: TextIO | None = None,
        every_s: float = 5.0,
        tty_every_s: float = 0.1,
    ) -> None:
        self.total = total_steps
        self.tokens_per_step = tokens_per_step
        self.name = name
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every_s = tty_every_s if self.tty else every_s
        self._start = time.perf_counter()
        self._start_step: int | None = None
        self._last_print = -math.inf  # the first update always prints

    def line(self, step: int, loss: float | None, val_loss: float | None = None) -> str:
        if self._start_step is None:
            self._start_step = step
            self._start = time.perf_counter()
        elapsed = time.perf_counter() - self._start
        done = step - self._start_step
        rate = done / elapsed if elapsed > 0 and done else 0.0
        loss_text = f"{loss:.4f}" if loss is not None else "-"
        val = f" val {val_loss:.4f}" if val_loss is not None else ""
        if rate:
            eta = _clock((self.total - step) / rate)
            speed = f"{rate * self.tokens_per_step:,.0f}"
        else:  # the first line: no step timed yet ("0" read as a stalled run)
            eta = speed = "-"
        return f"step {step}/{self.total} loss {loss_text}{val} tok/s {speed} eta {eta}"

    def update(
        self, step: int, loss: float | None, val_loss: float | None = None, force: bool = False
    ) -> None:
        now = time.perf_counter()
        if not (force or now - self._last_print >= self.every_s):
            return
        self._last_print = now
        text = self.line(step, loss, val_loss)
        if self.tty:
            width = 30
            filled = int(width * step / max(self.total, 1))
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r[{bar}] {text}")
            if force:
                self.stream.write("\n")
        else:
            self.stream.write(f"{text}\n")
        self.stream.flush()
