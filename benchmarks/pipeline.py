"""Pipeline benchmarks: the real ``contact-worker run`` against ``contact-worker simulate``.

Every run starts the simulated gateway in its own process (``contact-worker simulate --port 0``)
and the worker in another (``contact-worker run`` on a generated JSONL file), so that the figures
are those of the shipped command: interpreter start-up, file reading, decoding, coalescing,
batching, HTTP and acknowledgement included. For each worker run the harness records

* wall time from just before the worker is spawned to its exit (``time.perf_counter``);
* the worker's own CPU time (user + system), from ``os.wait4``'s rusage of exactly that child;
* its peak RSS: the kernel's high-water mark ``VmHWM`` of /proc/PID/status, polled every 20 ms
  until the process exits. Not ``ru_maxrss``: fork copies the parent's RSS high-water mark into
  the child and exec keeps the larger one, so a child's ``ru_maxrss`` is at least the harness's
  own peak (81 MB once it has generated a 1M-line stream), whatever the worker used. It is kept
  in the JSON as ``ru_maxrss_mb``, next to the harness's peak at the spawn;
* the worker's ``"event": "summary"`` log line (its counters and the engine's ``elapsed_s``,
  which leaves out interpreter start-up and imports);
* the simulator's ``GET /_sim/stats`` and its CPU time (``/proc/PID/stat``), to tell whether the
  simulated API, not the worker, was the bottleneck (both share a 2-core machine);
* the CPU that *other* processes used meanwhile (the machine's busy time from /proc/stat less
  the worker's, the simulator's and the harness's). Before each run the harness waits (up to
  ``--quiet-wait`` seconds) for others to use under a quarter of a core; a run they disturbed
  anyway is named in the report's notes. Run-to-run spread on a quiet 2-core VM is still about
  +-8 %: compare medians of several runs.

The machinery lives in ``harness.py``; ``stages.py`` times the worker's pure stages in-process.

Scenarios (the performance claims of the issue)
-----------------------------------------------
throughput
    Simulator at zero latency, every ID known; worker with batch 100, ``--rate 0``,
    concurrency 8, linger 5 ms; 500,000 changes over 100,000 contacts drawn uniformly, so most
    requests are full. Reports changes/s (records / worker wall time, and records / the engine's
    elapsed_s), requests/s, contacts per request and CPU seconds per 100k changes.
    Goal: >= 100,000 changes/s. ``--repeat`` runs (default 3); the median is the figure.
rate
    The API's rate limit against the worker's: simulator with ``--rate-limit R``, worker with
    ``--rate R`` (R=20, batch 100) on a backlog of 20,000 changes to 20,000 distinct IDs, so
    nothing coalesces and exactly 200 requests are needed. Reports the drain time against the
    least the rate allows (requests needed / R) and their ratio. Goal: ratio <= 1/0.9 (1.111).
    Then the worker's rate a bit above the API's (``--over``, default 25 vs 20): 429 counts,
    retries and the ratio. The simulator's token bucket holds a burst of R requests, so a drain
    can beat requests/R by up to one second's worth: that bound is shown too.
memory
    1,000,000 changes over 200,000 IDs streamed from a file, zero latency, rate 0: the worker's
    peak RSS (goal < 200 MB) and changes/s. A 1,000-change run gives the baseline RSS of an
    idle worker (interpreter and imports) to tell fixed cost from what the backlog adds.
profile
    The throughput scenario with the worker under cProfile (``python -m cProfile -o FILE -m
    worker.cli run ...``): the top functions by tottime and by cumtime, and tottime summed per
    source file. If py-spy is installed next to the interpreter, a second run is sampled with
    ``py-spy record`` (low overhead, no distortion of small calls): self and total shares per
    function, per file, and per engine task (reader vs senders). Everything goes to
    benchmarks/results/profile.txt (plus the raw .prof and py-spy files).

Usage::

    /work/venv/bin/python benchmarks/pipeline.py throughput [--repeat 3] [--changes N] ...
    /work/venv/bin/python benchmarks/pipeline.py rate [--rate 20] [--over 25]
    /work/venv/bin/python benchmarks/pipeline.py memory
    /work/venv/bin/python benchmarks/pipeline.py profile [--no-py-spy] [--native]

``--what-if CODE`` (throughput, memory, profile) runs Python in the worker process before its
``main()``, to try a change without editing ``worker/``, e.g. ``--what-if "import gc;
gc.set_threshold(10_000, 10, 10)"``; ``--tag NAME`` keeps such a run's files apart.

Each scenario prints Markdown tables and writes benchmarks/results/pipeline-SCENARIO.json.
Generated input files are cached under benchmarks/results/data/ (delete them to regenerate).
Run one scenario at a time, on an otherwise idle machine: the worker and the simulator each
want a core.
"""

from __future__ import annotations

import argparse
import collections
import io
import math
import pstats
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from harness import (
    QUIET,
    RESULTS,
    ROOT,
    BenchError,
    Report,
    Table,
    WorkerRun,
    check_run,
    distinct_file,
    log,
    median_cell,
    py_spy_path,
    ratio,
    report_name,
    run_pair,
    stream_file,
    unwind_on_signals,
    what_if_prefix,
    worker_entry,
    worker_options,
)

from worker.sim.stream import StreamSpec

GOAL_CHANGES_PER_S = 100_000
GOAL_RATE_RATIO = 1 / 0.9
GOAL_RSS_MB = 200.0

# -- scenarios ----------------------------------------------------------------------------------


def _throughput_spec(args: argparse.Namespace) -> StreamSpec:
    return StreamSpec(
        changes=args.changes,
        contacts=args.contacts,
        unknown_share=0.0,
        invalid=0,
        distribution="uniform",
        seed=args.seed,
    )


def _throughput_options(args: argparse.Namespace) -> list[str]:
    return worker_options(
        batch=args.batch_size,
        linger_ms=args.linger_ms,
        rate=0,
        concurrency=args.concurrency,
        max_waiting=args.max_waiting,
    )


def scenario_throughput(args: argparse.Namespace) -> Report:
    """Changes/s through the whole pipeline at zero API latency and no rate limit."""
    spec = _throughput_spec(args)
    source = stream_file(spec)
    options = _throughput_options(args)
    name = report_name(args)
    report = Report(name, {**vars(args), "worker_options": options, "source": str(source)})
    runs = []
    for i in range(1, args.repeat + 1):
        log(f"throughput run {i}/{args.repeat}: {spec.changes:,} changes, {spec.contacts:,} IDs")
        run = run_pair(
            source,
            options,
            ["--latency", "0"],
            label=f"{name}-{i}",
            timeout_s=args.timeout,
            prefix=what_if_prefix(args.what_if, name),
        )
        problems = check_run(run, spec.lines, spec.changes)
        runs.append(run)
        report.runs.append(run.to_json() | {"problems": problems})
        if problems:
            report.notes.append(f"run {i}: " + "; ".join(problems))
    rows = [_throughput_row(str(i), run) for i, run in enumerate(runs, start=1)]
    if len(runs) > 1:
        rows.append(["median", *(median_cell(col) for col in list(zip(*rows, strict=True))[1:])])
    report.tables.append(
        Table(
            f"throughput: {spec.changes:,} changes over {spec.contacts:,} IDs (uniform), batch "
            f"{args.batch_size}, rate 0, concurrency {args.concurrency}, linger "
            f"{args.linger_ms:g} ms, simulator latency 0",
            [
                "run",
                "wall s",
                "engine s",
                "changes/s (wall)",
                "changes/s (engine)",
                "requests",
                "requests/s (engine)",
                "contacts/request",
                "coalesced %",
                "worker CPU s",
                "CPU s / 100k changes",
                "worker CPU % of wall",
                "peak RSS MB",
                "simulator CPU s",
                "others' CPU % of a core",
            ],
            rows,
        )
    )
    best = rows[-1]
    report.goal(
        "changes/s, records / worker wall time",
        best[3],
        f">= {GOAL_CHANGES_PER_S:,}",
        best[3] >= GOAL_CHANGES_PER_S,
    )
    report.goal(
        "changes/s, records / engine elapsed_s",
        best[4],
        f">= {GOAL_CHANGES_PER_S:,}",
        best[4] >= GOAL_CHANGES_PER_S,
    )
    report.notes.append(
        "wall time includes interpreter start-up and imports; the engine's elapsed_s does not."
        " A worker CPU % near 100 means the worker is CPU-bound on its one core."
    )
    return report


def _throughput_row(label: str, run: WorkerRun) -> list[Any]:
    s = run.summary
    requests = int(s.get("requests", 0))
    contacts = int(s.get("contacts_applied", 0))
    changes = int(s.get("changes", 0))
    return [
        label,
        round(run.wall_s, 3),
        run.elapsed_s,
        round(ratio(run.records, run.wall_s)),
        round(ratio(run.records, run.elapsed_s)),
        requests,
        round(ratio(requests, run.elapsed_s), 1),
        round(ratio(contacts, requests), 1),
        round(100 * ratio(int(s.get("coalesced", 0)), changes), 1),
        round(run.cpu_s, 2),
        round(ratio(run.cpu_s, run.records) * 100_000, 3),
        round(100 * ratio(run.cpu_s, run.wall_s), 1),
        round(run.peak_rss_mb, 1),
        None if run.sim_cpu_s is None else round(run.sim_cpu_s, 2),
        run.other_cpu_pct,
    ]


def scenario_rate(args: argparse.Namespace) -> Report:
    """Drain time of a backlog under the API's rate limit, against the least the rate allows."""
    source = distinct_file(args.changes, args.seed)
    needed = math.ceil(args.changes / args.batch_size)
    pairs = [(args.rate, args.rate), *((over, args.rate) for over in args.over)]
    name = report_name(args)
    report = Report(name, {**vars(args), "source": str(source), "requests_needed": needed})
    rows = []
    for worker_rate, api_rate in pairs:
        least = needed / api_rate
        burst = max(1.0, api_rate)  # the simulator's token bucket starts full
        least_burst = max(0.0, needed - burst) / api_rate
        label = f"{name}-w{worker_rate:g}-api{api_rate:g}"
        log(f"{label}: {args.changes:,} distinct IDs, {needed} requests, least {least:.1f} s")
        options = worker_options(
            batch=args.batch_size,
            linger_ms=args.linger_ms,
            rate=worker_rate,
            concurrency=args.concurrency,
            max_waiting=None,
        )
        timeout = args.timeout or 120 + 10 * least
        run = run_pair(
            source,
            options,
            ["--latency", f"{args.latency:g}", "--rate-limit", f"{api_rate:g}"],
            label=label,
            timeout_s=timeout,
        )
        problems = check_run(run, args.changes, args.changes)
        report.runs.append(run.to_json() | {"problems": problems, "least_s": least})
        if problems:
            report.notes.append(f"{label}: " + "; ".join(problems))
        by_status = run.summary.get("requests_by_status", {})
        sim = run.sim_stats
        first, last = sim.get("first_request_at"), sim.get("last_request_at")
        span = last - first if first is not None and last is not None else math.nan
        engine_ratio = ratio(run.elapsed_s, least)
        rows.append(
            [
                f"{worker_rate:g}",
                f"{api_rate:g}",
                needed,
                int(run.summary.get("requests", 0)),
                int(by_status.get("204", 0)),
                int(by_status.get("429", 0)),
                int(run.summary.get("retries", 0)),
                round(least, 2),
                round(least_burst, 2),
                round(span, 2),
                run.elapsed_s,
                round(run.wall_s, 2),
                round(engine_ratio, 3),
                round(ratio(run.wall_s, least), 3),
                round(ratio(float(run.summary.get("rate_wait_s", 0.0)), args.concurrency), 2),
            ]
        )
        report.goal(
            f"drain / (requests needed / R), worker {worker_rate:g} vs API {api_rate:g}"
            " (engine elapsed_s)",
            round(engine_ratio, 3),
            f"<= {GOAL_RATE_RATIO:.3f}",
            engine_ratio <= GOAL_RATE_RATIO,
        )
    report.tables.append(
        Table(
            f"rate: backlog of {args.changes:,} changes to distinct IDs, batch "
            f"{args.batch_size}, concurrency {args.concurrency}, linger {args.linger_ms:g} ms, "
            f"simulator latency {args.latency:g} ms",
            [
                "worker rate",
                "API rate limit",
                "requests needed",
                "requests sent",
                "204",
                "429",
                "retries",
                "least s (needed/R)",
                "least s with API burst",
                "API span s (first..last request)",
                "engine s",
                "wall s",
                "ratio (engine)",
                "ratio (wall)",
                "limiter wait s per sender",
            ],
            rows,
        )
    )
    report.notes.append(
        "least s = requests needed / API rate; the simulator's token bucket starts with a burst"
        " of R requests, so the true floor is (needed - R) / R ('with API burst')."
    )
    report.notes.append(
        "ratio (engine) uses the engine's elapsed_s; ratio (wall) adds interpreter start-up."
    )
    return report


def scenario_memory(args: argparse.Namespace) -> Report:
    """Peak RSS of the worker streaming a large file, and the RSS of an almost idle worker."""
    spec = StreamSpec(
        changes=args.changes,
        contacts=args.contacts,
        unknown_share=0.0,
        invalid=0,
        distribution="uniform",
        seed=args.seed,
    )
    small = StreamSpec(changes=1_000, contacts=1_000, unknown_share=0.0, invalid=0, seed=args.seed)
    source, baseline_source = stream_file(spec), stream_file(small)
    options = worker_options(
        batch=args.batch_size,
        linger_ms=args.linger_ms,
        rate=0,
        concurrency=args.concurrency,
        max_waiting=args.max_waiting,
    )
    name = report_name(args)
    report = Report(name, {**vars(args), "worker_options": options, "source": str(source)})
    rows: list[list[Any]] = []
    rss: list[float] = []
    plan = [("baseline", small, baseline_source)]
    plan += [(f"memory-{i}", spec, source) for i in range(1, args.repeat + 1)]
    for label, this_spec, path in plan:
        log(f"memory {label}: {this_spec.changes:,} changes over {this_spec.contacts:,} IDs")
        run = run_pair(
            path,
            options,
            ["--latency", "0"],
            label=f"{name}-{label}",
            timeout_s=args.timeout,
            prefix=what_if_prefix(args.what_if, name),
        )
        problems = check_run(run, this_spec.lines, this_spec.changes)
        report.runs.append(run.to_json() | {"problems": problems, "label": label})
        if problems:
            report.notes.append(f"{label}: " + "; ".join(problems))
        rss.append(round(run.peak_rss_mb, 1))
        rows.append(
            [
                label,
                this_spec.changes,
                this_spec.contacts,
                round(path.stat().st_size / 2**20, 1),
                round(run.peak_rss_mb, 1),
                round(run.ru_maxrss_mb, 1),
                round(run.harness_rss_mb, 1),
                round(run.wall_s, 2),
                run.elapsed_s,
                round(ratio(run.records, run.wall_s)),
                round(ratio(run.records, run.elapsed_s)),
                round(run.cpu_s, 2),
                round(100 * ratio(run.cpu_s, run.wall_s), 1),
                None if run.sim_cpu_s is None else round(run.sim_cpu_s, 2),
                run.other_cpu_pct,
                int(run.summary.get("requests", 0)),
            ]
        )
    if args.repeat > 1:
        columns = list(zip(*rows[1:], strict=True))
        rows.append(["median", *(median_cell(col) for col in columns[1:])])
    report.tables.append(
        Table(
            f"memory: zero latency, rate 0, batch {args.batch_size}, concurrency "
            f"{args.concurrency}, max-waiting {args.max_waiting or 'default (50,000)'}",
            [
                "run",
                "changes",
                "IDs",
                "file MB",
                "peak RSS MB (VmHWM)",
                "wait4 ru_maxrss MB",
                "harness peak RSS MB at spawn",
                "wall s",
                "engine s",
                "changes/s (wall)",
                "changes/s (engine)",
                "worker CPU s",
                "worker CPU % of wall",
                "simulator CPU s",
                "others' CPU % of a core",
                "requests",
            ],
            rows,
        )
    )
    baseline, peak = rss[0], max(rss[1:])
    report.goal("peak RSS MB (largest run)", peak, f"< {GOAL_RSS_MB:g}", peak < GOAL_RSS_MB)
    report.notes.append(
        f"the backlog adds {peak - baseline:.1f} MB over the baseline worker's"
        f" {baseline:.1f} MB (interpreter, imports, buffers)."
    )
    report.notes.append(
        "wait4's ru_maxrss is max(the worker's peak, the harness's peak when it forked): a"
        " ceiling only; the peak is the worker's own VmHWM, polled every 20 ms."
    )
    return report


# -- profile ------------------------------------------------------------------------------------


def _short(filename: str) -> str:
    """A readable path: relative to the project or to site-packages."""
    for marker in ("/site-packages/", str(ROOT) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    if filename.startswith(sys.base_prefix):
        return "stdlib/" + Path(filename).name
    return filename


def _cprofile_tables(prof: Path, top: int) -> tuple[list[Table], str]:
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


def _py_spy_tables(path: Path, top: int, wall_s: float, rate: int) -> list[Table]:
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


def _profiled_row(name: str, run: WorkerRun) -> list[Any]:
    return [
        name,
        round(run.wall_s, 2),
        run.elapsed_s,
        round(ratio(run.records, run.wall_s)),
        round(run.cpu_s, 2),
    ]


def scenario_profile(args: argparse.Namespace) -> Report:
    """The throughput scenario under cProfile, and (if installed) sampled by py-spy."""
    spec = _throughput_spec(args)
    source = stream_file(spec)
    options = _throughput_options(args)
    name = report_name(args)
    report = Report(name, {**vars(args), "worker_options": options, "source": str(source)})
    RESULTS.mkdir(parents=True, exist_ok=True)
    entry = worker_entry(args.what_if, name)
    profiled: list[list[Any]] = []
    sections: list[str] = []
    if not args.no_cprofile:
        prof = RESULTS / f"{name}.prof"
        prof.unlink(missing_ok=True)
        log("profile: throughput run under cProfile")
        run = run_pair(
            source,
            options,
            ["--latency", "0"],
            label=f"{name}-cprofile",
            timeout_s=args.timeout,
            prefix=[sys.executable, "-m", "cProfile", "-o", str(prof), *entry],
        )
        if not prof.exists():
            raise BenchError(f"cProfile wrote no {prof}; log {run.log_path}")
        report.runs.append(run.to_json() | {"profiler": "cProfile", "output": str(prof)})
        profiled.append(_profiled_row("cProfile", run))
        tables, text = _cprofile_tables(prof, args.top)
        report.tables += tables
        sections += [t.markdown() for t in tables] + [text]
    spy = None if args.no_py_spy else py_spy_path()
    if spy is None:
        report.notes.append("py-spy not installed or --no-py-spy: no sampling run.")
    else:
        raw = RESULTS / f"{name}-py-spy.txt"
        raw.unlink(missing_ok=True)
        log("profile: throughput run sampled by py-spy")
        spied = run_pair(
            source,
            options,
            ["--latency", "0"],
            label=f"{name}-py-spy",
            timeout_s=args.timeout,
            prefix=[
                str(spy),
                "record",
                "--rate",
                str(args.spy_rate),
                "--format",
                "raw",
                "--nolineno",
                "--output",
                str(raw),
                *(["--native"] if args.native else []),
                "--",
                sys.executable,
                *entry,
            ],
        )
        report.runs.append(spied.to_json() | {"profiler": "py-spy", "output": str(raw)})
        profiled.append(_profiled_row("py-spy", spied))
        if not raw.exists():
            raise BenchError(f"py-spy wrote no {raw}; log {spied.log_path}")
        spy_tables = _py_spy_tables(raw, args.top, spied.wall_s, args.spy_rate)
        report.tables += spy_tables
        sections += ["# py-spy"] + [t.markdown() for t in spy_tables]
    if not profiled:
        raise BenchError("nothing to do: --no-cprofile and no py-spy run")
    report.tables.insert(
        0,
        Table(
            "profiled runs (profilers slow the worker: compare shares, not absolute times)",
            ["profiler", "wall s", "engine s", "changes/s (wall)", "CPU s (incl. profiler)"],
            profiled,
        ),
    )
    out = RESULTS / f"{name}.txt"
    with open(out, "w") as f:
        f.write(f"# pipeline profile ({spec.changes:,} changes, {spec.contacts:,} IDs)\n\n")
        f.write("\n\n".join(sections) + "\n")
    report.notes.append(f"full listings in {out.relative_to(ROOT)}")
    return report


# -- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Scenarios as subcommands, each with its own knobs."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")

    def common(p: argparse.ArgumentParser, *, timeout: float | None) -> None:
        p.add_argument("--batch-size", type=int, default=100)
        p.add_argument("--linger-ms", type=float, default=5.0)
        p.add_argument("--concurrency", type=int, default=8)
        p.add_argument("--seed", type=int, default=1, help="stream generator seed (1)")
        p.add_argument(
            "--timeout", type=float, default=timeout, help="seconds before a worker is killed"
        )
        p.add_argument(
            "--tag", default="", help="suffix of the result files' names (e.g. for a sweep)"
        )
        p.add_argument(
            "--quiet-wait",
            type=float,
            default=120.0,
            metavar="S",
            help="before each run, wait up to S seconds for other processes to use less than"
            " a quarter of a core (120; 0 = don't wait)",
        )

    def what_if(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--what-if",
            metavar="CODE",
            help="Python run in the worker process before main(), for experiments, e.g."
            " 'import gc; gc.disable()' or 'import worker.engine as e; e.READ_SLICE = 256'",
        )

    for name in ("throughput", "profile"):
        p = sub.add_parser(name, help=f"the {name} scenario (see the module docstring)")
        common(p, timeout=600.0)
        p.add_argument("--changes", type=int, default=500_000)
        p.add_argument("--contacts", type=int, default=100_000)
        p.add_argument("--max-waiting", type=int, default=None, help="worker default if unset")
        what_if(p)
        if name == "throughput":
            p.add_argument("--repeat", type=int, default=3, help="runs; the median is reported")
        else:
            p.add_argument("--top", type=int, default=25, help="functions per table (25)")
            p.add_argument("--no-py-spy", action="store_true", help="skip the py-spy run")
            p.add_argument("--spy-rate", type=int, default=250, help="py-spy samples/s (250)")
            p.add_argument("--native", action="store_true", help="py-spy --native")
            p.add_argument("--no-cprofile", action="store_true", help="skip the cProfile run")

    p = sub.add_parser("rate", help="API rate limit vs the worker's rate")
    common(p, timeout=None)
    p.add_argument("--rate", type=float, default=20.0, help="API limit and worker rate (20)")
    p.add_argument(
        "--over", type=float, nargs="*", default=[25.0], help="worker rates above the API's (25)"
    )
    p.add_argument("--changes", type=int, default=20_000, help="distinct IDs, one change each")
    p.add_argument("--latency", type=float, default=0.0, help="simulator latency in ms (0)")

    p = sub.add_parser("memory", help="peak RSS streaming a large file")
    common(p, timeout=900.0)
    p.add_argument("--changes", type=int, default=1_000_000)
    p.add_argument("--contacts", type=int, default=200_000)
    p.add_argument("--max-waiting", type=int, default=None, help="worker default if unset")
    p.add_argument("--repeat", type=int, default=1, help="runs of the large stream (1)")
    what_if(p)
    return parser


SCENARIOS = {
    "throughput": scenario_throughput,
    "rate": scenario_rate,
    "memory": scenario_memory,
    "profile": scenario_profile,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one scenario, print its Markdown report, write its JSON; 1 on a failed run."""
    args = build_parser().parse_args(argv)
    unwind_on_signals()
    QUIET.max_wait_s = args.quiet_wait
    try:
        report = SCENARIOS[args.scenario](args)
    except BenchError as exc:
        print(f"pipeline {args.scenario}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pipeline {args.scenario}: interrupted", file=sys.stderr)
        return 130
    print(report.markdown())
    path = report.save()
    log(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
