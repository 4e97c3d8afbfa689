"""Feedback on long steps: rich bars on a terminal, plain periodic lines on stderr when piped or logged, and
nothing with --quiet. Torch-free; the library takes a `Progress` and the CLI chooses its mode.

    progress = Progress.for_stream(sys.stderr, quiet=False)
    with progress.task("extracting", total=len(paths), unit="images") as advance:
        for batch in batches:
            ...
            advance(len(batch))
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

Advance = Callable[[int], None]


class Progress:
    """`mode` is "bar" (rich, for a terminal), "lines" (one plain line every `interval` seconds and one at the
    end of each task) or "off"."""

    def __init__(self, mode: str = "off", stream: TextIO | None = None, interval: float = 10.0, console=None):
        if mode not in ("bar", "lines", "off"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode, self.stream, self.interval, self.console = mode, stream or sys.stderr, interval, console
        self._bars = None

    @classmethod
    def for_stream(cls, stream: TextIO, quiet: bool = False, console=None, interval: float = 10.0) -> Progress:
        """Bars on a terminal, lines otherwise, nothing when quiet."""
        if quiet:
            return cls("off")
        return cls("bar" if stream.isatty() else "lines", stream, interval, console)

    @contextmanager
    def task(self, description: str, total: int | None = None, unit: str = "items",
             min_seconds: float = 1.0) -> Iterator[Advance]:
        """A step of known (or unknown) size; yields `advance(n)`. In "lines" mode a step that ends within
        `min_seconds` prints nothing (0: always a closing line, as every training epoch has)."""
        if self.mode == "off":
            yield lambda _n=1: None
        elif self.mode == "bar":
            with self._bar_task(description, total) as advance:
                yield advance
        else:
            with self._line_task(description, total, unit, min_seconds) as advance:
                yield advance

    def log(self, line: str) -> None:
        """A line of output that must not tear a bar (printed above it)."""
        if self._bars is not None:
            self._bars.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, flush=True)

    # --- terminal ---------------------------------------------------------------------------------------------------
    @contextmanager
    def _bar_task(self, description: str, total: int | None) -> Iterator[Advance]:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bars

        owner = self._bars is None
        if owner:
            columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TimeRemainingColumn())
            self._bars = Bars(*columns, console=self.console, transient=True)
            self._bars.start()
        bars = self._bars
        task = bars.add_task(description, total=total)
        try:
            yield lambda n=1: bars.advance(task, n)
        finally:
            bars.remove_task(task)
            if owner:
                bars.stop()
                self._bars = None

    # --- logs and pipes ---------------------------------------------------------------------------------------------
    @contextmanager
    def _line_task(self, description: str, total: int | None, unit: str, min_seconds: float) -> Iterator[Advance]:
        started = last = time.monotonic()
        done = 0

        def line(final: bool) -> str:
            elapsed = max(time.monotonic() - started, 1e-9)
            if total is None and done == 0:  # a step without countable parts: its duration only
                return f"{description}: {elapsed:.0f}s" + (" (done)" if final else "")
            rate = done / elapsed
            count = f"{done}/{total}" if total is not None else f"{done}"
            text = f"{description}: {count} {unit}, {rate:.1f} {unit}/s, {elapsed:.0f}s"
            if not final and total is not None and rate > 0:
                text += f", ETA {max(0.0, (total - done) / rate):.0f}s"
            return text + (" (done)" if final else "")

        def advance(n: int = 1) -> None:
            nonlocal done, last
            done += n
            now = time.monotonic()
            if now - last >= self.interval:
                last = now
                print(line(False), file=self.stream, flush=True)

        yield advance
        if time.monotonic() - started >= min_seconds or last != started:
            print(line(True), file=self.stream, flush=True)


SILENT = Progress("off")
