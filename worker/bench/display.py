"""Where a benchmark's progress goes: a rich progress bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import sys
import time
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class Display(Protocol):
    """Where progress goes: what the harness tells about each run."""

    def start(self, label: str, total: int) -> None:
        """A run of ``total`` lines begins."""

    def update(self, done: int) -> None:
        """``done`` lines of the current run are acknowledged."""

    def finish(self, message: str) -> None:
        """The current run ended; one line about it."""

    def note(self, message: str) -> None:
        """Something worth a line of its own."""


class PlainDisplay:
    """Progress as occasional plain lines on stderr (no terminal tricks)."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._label, self._total, self._last = "", 0, 0.0

    def start(self, label: str, total: int) -> None:
        """See :class:`Display`."""
        self._label, self._total, self._last = label, total, time.monotonic()
        self.note(f"{label}: {total:,} lines")

    def update(self, done: int) -> None:
        """See :class:`Display`."""
        if time.monotonic() - self._last >= self.interval_s:
            self._last = time.monotonic()
            self.note(f"{self._label}: {done:,}/{self._total:,}")

    def finish(self, message: str) -> None:
        """See :class:`Display`."""
        self.note(f"{self._label}: {message}")

    def note(self, message: str) -> None:
        """See :class:`Display`."""
        print(f"[bench] {message}", file=sys.stderr, flush=True)


class RateColumn(ProgressColumn):
    """Lines acknowledged per second."""

    def render(self, task: Task) -> Text:
        """The task's speed, if known."""
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} changes/s", style="cyan")


class RichDisplay:
    """A progress bar per run (rate and ETA), the finished runs logged above it."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task: TaskID | None = None
        self.label = ""

    def start(self, label: str, total: int) -> None:
        """See :class:`Display`."""
        self.label = label
        self.task = self.progress.add_task(label, total=total)

    def update(self, done: int) -> None:
        """See :class:`Display`."""
        if self.task is not None:
            self.progress.update(self.task, completed=done)

    def finish(self, message: str) -> None:
        """See :class:`Display`."""
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        self.progress.console.print(f"  {self.label}: {message}", highlight=False)

    def note(self, message: str) -> None:
        """See :class:`Display`."""
        self.progress.console.print(f"[bold]{message}[/bold]", highlight=False)
