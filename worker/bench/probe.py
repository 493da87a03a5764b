"""``python -m worker.bench.probe run ...``: the real ``contact-worker`` with a measuring probe.

The probe wraps the ``jsonl:`` source's ``read`` and ``ack`` (nothing else changes): it notes
when each chunk of lines was read, and at each acknowledgement adds ``now - read time`` to a
latency histogram, one sample per change. That is the change-to-ack latency inside the worker:
from the moment a change entered the worker to the moment it was applied or dead-lettered.
Cost: a few hundred nanoseconds per change, a few kilobytes, and the token lists a file read
without a checkpoint would otherwise not build (the probe reads every token).

On stdout (the worker itself writes only to stderr) it prints JSON lines: ``ready`` once the
worker's modules are imported, ``progress`` (lines read and acknowledged) four times a second.
At exit the histogram goes to the file named by ``CONTACT_WORKER_PROBE_OUT``.
"""

from __future__ import annotations

import bisect
import json
import os
import sys
import threading
import time
from collections.abc import Hashable, Sequence
from typing import Any, cast

from worker.backends.base import Record
from worker.backends.jsonl.source import JsonlSource
from worker.bench.harness import PROBE_OUT_ENV
from worker.bench.histogram import Histogram
from worker.cli import main as worker_main

PROGRESS_INTERVAL_S = 0.25


class Probe:
    """Read times per chunk of lines, and the latency histogram of acknowledged changes."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self.first_lines: list[int] = []
        self.read_at: list[float] = []
        self.histogram = Histogram()
        self.lines_read = 0
        self.acked = 0

    def on_read(self, records: Sequence[Record] | None) -> None:
        """A chunk of records came from the source."""
        if records:
            first = records[0][0]
            assert isinstance(first, int)
            self.first_lines.append(first)
            self.read_at.append(self.clock())
            self.lines_read += len(records)

    def on_ack(self, tokens: Sequence[Hashable]) -> None:
        """These lines (tokens are line numbers) are done now."""
        now = self.clock()
        firsts, times = self.first_lines, self.read_at
        # Sorted, the lines of one chunk are a run: one bisect per chunk, not per line.
        lines = sorted(cast(Sequence[int], tokens))
        start, count = 0, len(lines)
        add = self.histogram.add_many
        while start < count:
            chunk = bisect.bisect_right(firsts, lines[start]) - 1
            if chunk + 1 < len(firsts):
                end = bisect.bisect_left(lines, firsts[chunk + 1], start)
            else:
                end = count
            add(now - times[chunk] if chunk >= 0 else 0.0, end - start)
            start = end
        self.acked += count

    def progress(self) -> dict[str, Any]:
        """The progress line."""
        return {"event": "progress", "read": self.lines_read, "acked": self.acked}


def install(probe: Probe) -> None:
    """Wrap JsonlSource.read and JsonlSource.ack to feed ``probe``."""
    read, ack = JsonlSource.read, JsonlSource.ack

    async def probed_read(self: JsonlSource) -> Sequence[Record] | None:
        records = await read(self)
        probe.on_read(records)
        return records

    async def probed_ack(self: JsonlSource, tokens: Sequence[Hashable]) -> None:
        probe.on_ack(tokens)
        await ack(self, tokens)

    setattr(JsonlSource, "read", probed_read)  # noqa: B010 - a deliberate patch
    setattr(JsonlSource, "ack", probed_ack)  # noqa: B010
    # The probe needs each line's token: the source acknowledges by token, never by count
    # (as it does with a checkpoint; without one it would hand the engine only a count).
    setattr(JsonlSource, "acks_by_count", property(lambda self: False))  # noqa: B010


def _say(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``contact-worker`` with the probe; the worker's exit code."""
    probe = Probe()
    install(probe)
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(PROGRESS_INTERVAL_S):
            _say(probe.progress())

    reporter = threading.Thread(target=report, daemon=True)
    _say({"event": "ready"})
    reporter.start()
    try:
        return worker_main(argv)
    finally:
        stop.set()
        reporter.join()
        _say(probe.progress())
        out = os.environ.get(PROBE_OUT_ENV)
        if out:
            with open(out, "w") as f:
                json.dump({"latency": probe.histogram.to_json(), "acked": probe.acked}, f)


if __name__ == "__main__":
    sys.exit(main())
