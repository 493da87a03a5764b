"""Where the worker's CPU goes per change: its pure stages timed in-process, without I/O.

``pipeline.py throughput`` measures the whole command; this script replays the same stream
through the same code the engine calls, synchronously and without a network, and times each
stage per change:

split
    ``JsonlSource._split``: 256 KiB chunks into lines, with the per-line progress bookkeeping.
decode
    ``worker.core.change.decode_all`` (``orjson.loads`` + the field check, by slices); two extra
    passes time ``orjson.loads`` and ``validate`` alone.
add
    ``Scheduler.add_all`` (the coalescer's merge and ready queue, a slice at a time).
form
    ``Scheduler.next_batch`` (``fill``: popping ready entries, encoding the body in one call).
body
    ``Batch.body`` (encoded by ``fill`` already: nothing left to do).
resolve
    ``Scheduler.resolve`` of an applied batch (release of the IDs).
ack
    the engine's token list and ``Progress.ack`` per line.

The loop mirrors the engine's: slices of ``READ_SLICE`` records are added while the scheduler
has room; when it is full, batches are formed and resolved as applied until it has room again;
at the end everything is flushed. Every batch is applied at once (zero latency, nothing in
flight), so coalescing is close to the real run's. Each pass runs with the cyclic GC on (its
pauses timed through ``gc.callbacks``) and off. What the end-to-end run spends beyond these
stages is the event loop, aiohttp and the kernel's socket work: if benchmarks/results/
pipeline-throughput.json exists, its median CPU per change is shown next to the stages' sum.

Usage: ``.venv/bin/python benchmarks/stages.py [--changes N --contacts N --repeat 3]``;
prints Markdown, writes benchmarks/results/pipeline-stages.json.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from pipeline import DATA, RESULTS, Report

from worker.backends.jsonl.source import CHUNK_BYTES, JsonlSource
from worker.bench.harness import stream_file
from worker.bench.report import Table
from worker.core.batch import Batch, BatchLimits
from worker.core.change import decode_all, validate
from worker.core.classify import Action, Verdict
from worker.core.scheduler import DEFAULT_MAX_WAITING, Scheduler, SchedulerSettings
from worker.engine import READ_SLICE
from worker.sim.stream import StreamSpec

STAGES = ("split", "decode", "add", "form", "body", "resolve", "ack")


class GcTimer:
    """Sums the time the cyclic GC spends collecting, through ``gc.callbacks``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = 0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections += 1

    def __enter__(self) -> GcTimer:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def replay(
    data: bytes, path: Path, *, batch_size: int, max_waiting: int
) -> tuple[dict[str, float], dict[str, int]]:
    """One synchronous pass of the stream through the stages: seconds per stage, and counts."""
    clock = time.perf_counter
    spent: collections.defaultdict[str, float] = collections.defaultdict(float)
    # With a checkpoint, as a worker that can resume: the source keeps the per-line progress
    # (it is never opened here, so nothing is written).
    source = JsonlSource(str(path), checkpoint=str(path.with_name(path.name + ".checkpoint")))
    ack = source.progress.ack
    limits = BatchLimits(batch_size, 1 << 20, 0.005)
    scheduler = Scheduler(SchedulerSettings(limits=limits, max_waiting=max_waiting))
    applied = Verdict(Action.APPLIED, 204)
    counts = collections.Counter[str]()

    def send_one(now: float) -> bool:
        t0 = clock()
        planned = scheduler.next_batch(now)
        t1 = clock()
        if not isinstance(planned, Batch):
            return False
        body = planned.body()
        t2 = clock()
        settled = scheduler.resolve(planned, applied, now)
        t3 = clock()
        for token in [token for entry in settled.applied for token in entry.tokens]:
            ack(token)  # type: ignore[arg-type]  # line numbers, as the engine acks them
        t4 = clock()
        spent["form"] += t1 - t0
        spent["body"] += t2 - t1
        spent["resolve"] += t3 - t2
        spent["ack"] += t4 - t3
        counts["requests"] += 1
        counts["bytes"] += len(body)
        return True

    for offset in range(0, len(data), CHUNK_BYTES):
        t0 = clock()
        records = source._split(data[offset : offset + CHUNK_BYTES])
        spent["split"] += clock() - t0
        for start in range(0, len(records), READ_SLICE):
            now = clock()
            while not scheduler.has_room:
                send_one(now)
            t0 = clock()
            piece = records[start : start + READ_SLICE]
            valid, _ = decode_all(piece)
            t1 = clock()
            scheduler.add_all(valid, now)
            spent["decode"] += t1 - t0
            spent["add"] += clock() - t1
            counts["changes"] += len(piece)
    scheduler.draining = True
    while send_one(clock()):
        pass
    counts["coalesced"] = scheduler.coalescer.coalesced
    return dict(spent), dict(counts)


def time_alone(lines: Sequence[bytes]) -> dict[str, float]:
    """Seconds for ``orjson.loads`` alone and ``validate`` alone over the lines (GC off)."""
    clock = time.perf_counter
    loads = orjson.loads
    t0 = clock()
    objs = [loads(line) for line in lines]
    t1 = clock()
    for obj in objs:
        validate(obj)
    t2 = clock()
    return {"orjson.loads": t1 - t0, "validate": t2 - t1}


def _e2e_cpu_us_per_change() -> float | None:
    path = RESULTS / "pipeline-throughput.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    per = [r["cpu_s"] / r["summary"]["records_read"] * 1e6 for r in data.get("runs", [])]
    return statistics.median(per) if per else None


def note(message: str) -> None:
    """Progress notes go to stderr, so stdout holds only the Markdown report."""
    print(f"[stages] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> Report:
    """Time the stages ``--repeat`` times with the GC on and off; the medians per change."""
    spec = StreamSpec(
        changes=args.changes,
        contacts=args.contacts,
        unknown_share=0.0,
        invalid=0,
        seed=args.seed,
    )
    path = stream_file(spec, DATA, note)
    data = path.read_bytes()
    lines = data.splitlines()
    report = Report("stages", {**vars(args), "source": str(path)})
    results: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    extra: list[dict[str, float]] = []
    counts: dict[str, int] = {}
    for i in range(args.repeat):
        for mode in ("on", "off"):
            gc.collect()
            if mode == "off":
                gc.disable()
            try:
                with GcTimer() as timer:
                    spent, counts = replay(
                        data, path, batch_size=args.batch_size, max_waiting=args.max_waiting
                    )
            finally:
                gc.enable()
            spent["gc pauses (inside the stages)"] = timer.seconds
            results[mode].append(spent)
            note(f"pass {i + 1} gc {mode}: {sum(spent.values()):.2f} s")
        gc.disable()
        try:
            extra.append(time_alone(lines))
        finally:
            gc.enable()
    changes = counts["changes"]

    def per_change(samples: list[dict[str, float]], key: str) -> float:
        return statistics.median(s.get(key, 0.0) for s in samples) / changes * 1e6

    rows: list[list[Any]] = []
    total = {mode: sum(per_change(results[mode], s) for s in STAGES) for mode in results}
    for stage in STAGES:
        on, off = per_change(results["on"], stage), per_change(results["off"], stage)
        share_on, share_off = 100 * on / total["on"], 100 * off / total["off"]
        rows.append([stage, round(on, 3), round(share_on, 1), round(off, 3), round(share_off, 1)])
        if stage == "decode":
            for part in ("orjson.loads", "validate"):
                alone = per_change(extra, part)
                rows.append([f"  of which {part} (timed alone)", "-", "-", round(alone, 3), "-"])
    gc_key = "gc pauses (inside the stages)"
    gc_on = per_change(results["on"], gc_key)
    rows.append([gc_key, round(gc_on, 3), round(100 * gc_on / total["on"], 1), 0.0, 0.0])
    rows.append(["sum of the stages", round(total["on"], 3), 100.0, round(total["off"], 3), 100.0])
    e2e = _e2e_cpu_us_per_change()
    if e2e is not None:
        rest = e2e - total["on"]
        rows.append(
            [
                "end-to-end worker CPU (pipeline throughput, median)",
                round(e2e, 3),
                "-",
                "-",
                "-",
            ]
        )
        rows.append(
            [
                "rest: event loop, aiohttp, sockets, start-up",
                round(rest, 3),
                f"{100 * rest / e2e:.1f}% of e2e",
                "-",
                "-",
            ]
        )
    report.tables.append(
        Table(
            f"stages: µs of CPU per change, {changes:,} changes over {args.contacts:,} IDs,"
            f" batch {args.batch_size}, max-waiting {args.max_waiting:,}; median of"
            f" {args.repeat} passes; {counts['requests']:,} batches,"
            f" {100 * counts['coalesced'] / changes:.1f}% coalesced",
            ["stage", "µs/change (GC on)", "% (GC on)", "µs/change (GC off)", "% (GC off)"],
            rows,
        )
    )
    report.runs = [
        {"gc": mode, "pass": i + 1, "seconds": spent}
        for mode, passes in results.items()
        for i, spent in enumerate(passes)
    ]
    report.notes.append(
        "GC on: stage times include the GC pauses that their allocations triggered (their sum"
        " is the 'gc pauses' row); 'sum of the stages' adds only the stages."
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, run, print Markdown, write benchmarks/results/pipeline-stages.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=500_000)
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    note(f"wrote {run(args).publish()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
