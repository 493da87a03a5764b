"""The profilers' output as tables: cProfile's stats and py-spy's raw samples.

``pipeline.py profile`` runs the worker under each profiler; this module reads what they wrote.
"""

from __future__ import annotations

import collections
import io
import pstats
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from worker.bench.report import Table

ROOT = Path(__file__).resolve().parent.parent


def py_spy_path() -> Path | None:
    """py-spy next to the interpreter or on PATH, if installed."""
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return local
    found = shutil.which("py-spy")
    return Path(found) if found else None


def _short(filename: str) -> str:
    """A readable path: relative to the project or to site-packages."""
    for marker in ("/site-packages/", str(ROOT) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    if filename.startswith(sys.base_prefix):
        return "stdlib/" + Path(filename).name
    return filename


def cprofile_tables(prof: Path, top: int) -> tuple[list[Table], str]:
    """Top functions by tottime and cumtime, tottime per file; and pstats' own text."""
    stats = pstats.Stats(str(prof))
    entries = stats.stats  # type: ignore[attr-defined]
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    for (filename, line, name), (_cc, ncalls, tt, ct, _callers) in entries.items():
        where = name if filename == "~" else f"{_short(filename)}:{line}({name})"
        rows.append((where, ncalls, tt, ct))
    tables = []
    for key, index in (("tottime", 2), ("cumtime", 3)):
        ranked = sorted(rows, key=lambda r: r[index], reverse=True)[:top]
        tables.append(
            Table(
                f"cProfile: top {top} by {key} (total {total:.2f} s of profiled time)",
                ["function", "calls", "tottime s", "tottime %", "cumtime s", "cumtime %"],
                [
                    [
                        w,
                        n,
                        round(tt, 3),
                        round(100 * tt / total, 1),
                        round(ct, 3),
                        round(100 * ct / total, 1),
                    ]
                    for w, n, tt, ct in ranked
                ],
            )
        )
    per_file: collections.Counter[str] = collections.Counter()
    for (filename, _line, name), (_cc, _n, tt, _ct, _callers) in entries.items():
        per_file[_file_group(filename, name)] += tt
    tables.append(
        Table(
            "cProfile: tottime per source file (C builtins grouped by name)",
            ["file", "tottime s", "%"],
            [[f, round(t, 3), round(100 * t / total, 1)] for f, t in per_file.most_common(top)],
        )
    )
    text = io.StringIO()
    for key in ("tottime", "cumulative"):
        text.write(f"\n==== pstats sorted by {key} ====\n")
        pstats.Stats(str(prof), stream=text).sort_stats(key).print_stats(top)
    return tables, text.getvalue()


def _file_group(filename: str, name: str) -> str:
    if filename == "~":
        return name.split(" of ")[0].strip("<>").removeprefix("built-in method ")
    return _short(filename)


def _py_spy_frames(path: Path) -> Iterator[tuple[list[str], int]]:
    """(stack root first, count) from py-spy's raw (collapsed) output."""
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if stack and count.isdigit():
                yield stack.split(";"), int(count)


def py_spy_tables(path: Path, top: int, wall_s: float, rate: int) -> list[Table]:
    """Self and total shares per function and per file, and samples per engine task."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    files: collections.Counter[str] = collections.Counter()
    tasks: collections.Counter[str] = collections.Counter()
    samples = parked = 0
    for frames, count in _py_spy_frames(path):
        leaf = frames[-1]
        if leaf.startswith(PARKED):  # an idle thread py-spy took for a busy one
            parked += count
            continue
        samples += count
        own[leaf] += count
        files[leaf.rpartition(" (")[2].rstrip(")")] += count
        for frame in set(frames):
            total[frame] += count
        tasks[_engine_task(frames)] += count
    if not samples:
        return []
    pct = 100 / samples
    expected = wall_s * rate
    tables = [
        Table(
            f"py-spy: top {top} functions by self samples (% of {samples:,} busy samples; the"
            f" wall time at {rate}/s is ~{expected:,.0f}; {parked:,} samples of parked threads"
            " left out)",
            ["function (file)", "self %", "total %"],
            [[f, round(c * pct, 1), round(total[f] * pct, 1)] for f, c in own.most_common(top)],
        ),
        Table(
            f"py-spy: top {top} functions by total (inclusive) samples",
            ["function (file)", "total %", "self %"],
            [[f, round(c * pct, 1), round(own[f] * pct, 1)] for f, c in total.most_common(top)],
        ),
        Table(
            "py-spy: self samples per file",
            ["file", "self %"],
            [[f, round(c * pct, 1)] for f, c in files.most_common(top)],
        ),
        Table(
            "py-spy: busy samples per engine task (outermost worker/engine.py frame)",
            ["task", "%"],
            [[t, round(c * pct, 1)] for t, c in tasks.most_common()],
        ),
    ]
    return tables


PARKED = ("Condition.wait (threading.py)", "Queue.get (queue.py)")
"""Leaf frames of a thread waiting for work (anyio's file-reading threads)."""


def _engine_task(frames: Sequence[str]) -> str:
    """Which part of the worker a sample belongs to, from its stack (root first)."""
    if any("importlib._bootstrap" in frame for frame in frames):
        return "(start-up: imports)"
    for frame in frames:
        if "worker/engine.py" in frame and not frame.startswith("<module>"):
            return frame.split(" (")[0]
    if any("threading.py" in frame for frame in frames):
        return "(worker threads: file reads via anyio.to_thread)"
    return "(event loop and aiohttp callbacks, no engine frame)"
