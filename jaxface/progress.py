"""Throughput meter and progress display: a live line on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class Meter:
    """Samples/s between log points; the clock starts when the first (compiling) step is done."""

    def __init__(self, total_steps: int, global_batch: int):
        self.total_steps = total_steps
        self.global_batch = global_batch
        self._t0: float | None = None
        self._step0 = 0
        self._last_t = 0.0
        self._last_step = 0

    def start(self, step: int) -> None:
        self._t0 = self._last_t = time.perf_counter()
        self._step0 = self._last_step = step

    def window(self, step: int) -> dict[str, float]:
        """Throughput since the previous call and the ETA from the average so far."""
        now = time.perf_counter()
        if self._t0 is None or step <= self._last_step:
            return {"samples_per_sec": float("nan"), "eta_s": float("nan")}
        rate = (step - self._last_step) * self.global_batch / (now - self._last_t)
        per_step = (now - self._t0) / (step - self._step0)
        self._last_t, self._last_step = now, step
        return {
            "samples_per_sec": rate,
            "eta_s": per_step * (self.total_steps - step),
            "elapsed_s": now - self._t0,
        }


class Progress:
    """`mode` is bar (rewrites one line, for terminals) or plain (one line per update)."""

    def __init__(
        self, mode: str, total_steps: int, stream: TextIO | None = None, quiet: bool = False
    ):
        self.stream = stream or sys.stdout
        self.quiet = quiet  # processes other than 0 of a multi-host run
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "plain"
        self.mode = mode
        self.total_steps = total_steps
        self._bar_shown = False

    def _describe(self, rec: dict) -> str:
        return (
            f"loss {rec['loss']:.4f}  lr {rec['lr']:.5f}  "
            f"{rec['samples_per_sec']:,.0f} samples/s  ETA {format_duration(rec['eta_s'])}"
            if rec["samples_per_sec"] == rec["samples_per_sec"]
            else f"loss {rec['loss']:.4f}  lr {rec['lr']:.5f}"
        )

    def update(self, rec: dict) -> None:
        if self.quiet:
            return
        step, total = rec["step"], self.total_steps
        if self.mode == "bar":
            width = 24
            filled = int(width * step / total)
            bar = "#" * filled + "-" * (width - filled)
            line = (
                f"\rstep {step}/{total} [{bar}] {100 * step / total:3.0f}%  {self._describe(rec)}"
            )
            self.stream.write(line + "\x1b[K")
            self._bar_shown = True
        else:
            self.stream.write(f"step {step}/{total}  {self._describe(rec)}\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (above the live line on a terminal)."""
        if self.quiet:
            return
        if self._bar_shown:
            self.stream.write("\r\x1b[K")
            self._bar_shown = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._bar_shown:
            self.stream.write("\n")
            self.stream.flush()
            self._bar_shown = False
