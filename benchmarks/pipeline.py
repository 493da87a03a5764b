"""Pipeline benchmarks: the real ``contact-worker run`` against ``contact-worker simulate``.

Every run starts the simulated gateway in its own process (``contact-worker simulate --port 0``)
and the worker in another (``contact-worker run`` on a generated JSONL file), so that the figures
are those of the shipped command: interpreter start-up, file reading, decoding, coalescing,
batching, HTTP and acknowledgement included. The runs are measured as ``contact-worker bench``
measures them (``worker.bench.processes``); for each worker run the report holds

* wall time from just before the worker is spawned to its exit (``time.perf_counter``);
* the worker's own CPU time (user + system), from ``os.wait4``'s rusage of exactly that child;
* its peak RSS: the kernel's high-water mark ``VmHWM``, polled. Not ``ru_maxrss``: a child's is
  at least the harness's own peak at the fork (81 MB once it has generated a 1M-line stream),
  whatever the worker used. It is kept in the JSON as ``ru_maxrss_mb``, next to the harness's
  peak at the spawn;
* the worker's ``"event": "summary"`` log line (its counters and the engine's ``elapsed_s``,
  which leaves out interpreter start-up and imports);
* the simulator's ``GET /_sim/stats`` and its CPU time (``/proc/PID/stat``), to tell whether the
  simulated API, not the worker, was the bottleneck (both share a 2-core machine);
* the CPU that *other* processes used meanwhile (the machine's busy time from /proc/stat less
  the worker's, the simulator's and the harness's). Before each run the harness waits (up to
  ``--quiet-wait`` seconds) for others to use under a quarter of a core; a run they disturbed
  anyway is named in the report's notes. Run-to-run spread on a quiet 2-core VM is still about
  +-8 %: compare medians of several runs.

The machinery is ``worker.bench``'s; ``profiling.py`` reads the profilers' output, and
``stages.py`` times the worker's pure stages in-process.

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

    .venv/bin/python benchmarks/pipeline.py throughput [--repeat 3] [--changes N] ...
    .venv/bin/python benchmarks/pipeline.py rate [--rate 20] [--over 25]
    .venv/bin/python benchmarks/pipeline.py memory
    .venv/bin/python benchmarks/pipeline.py profile [--no-py-spy] [--native]

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
import datetime
import math
import signal
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from profiling import ROOT, cprofile_tables, py_spy_path, py_spy_tables

from worker.bench.harness import cached, run_args, stream_file, worker_flags, worker_summary
from worker.bench.processes import (
    BenchError,
    Measured,
    ProcessRun,
    Quiet,
    byte_compile,
    cli_command,
    machine,
    measure,
    run_process,
    status_mb,
    worker_env,
)
from worker.bench.report import Table
from worker.bench.scenario import WorkerConfig
from worker.core.scheduler import DEFAULT_MAX_WAITING
from worker.sim.stream import StreamSpec, generate_lines

RESULTS = ROOT / "benchmarks" / "results"
DATA = RESULTS / "data"
LOGS = RESULTS / "logs"
GOAL_CHANGES_PER_S = 100_000
GOAL_RATE_RATIO = 1 / 0.9
GOAL_RSS_MB = 200.0
QUIET = Quiet(max_wait_s=120.0)
"""Set from the command line in main()."""


def log(message: str) -> None:
    """Progress notes go to stderr, so stdout holds only the Markdown report."""
    print(f"[pipeline] {message}", file=sys.stderr, flush=True)


# -- inputs -------------------------------------------------------------------------------------


def distinct_file(count: int, seed: int = 1) -> Path:
    """A cached JSONL file of ``count`` realistic changes to IDs 1..count, each ID exactly once.

    The field values come from the stream generator; only the IDs are rewritten (keeping the
    generator's mix of string and integer IDs), so nothing can coalesce.
    """
    spec = StreamSpec(changes=count, contacts=count, unknown_share=0.0, invalid=0, seed=seed)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            for number, line in enumerate(generate_lines(spec), start=1):
                obj = orjson.loads(line)
                obj["ID"] = number if type(obj["ID"]) is int else str(number)
                out.write(orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE))

    return cached(DATA / f"distinct-{count}c-s{seed}.jsonl", write, log)


# -- runs ---------------------------------------------------------------------------------------


@dataclass
class WorkerRun:
    """One ``contact-worker run`` to its end against its own simulator: cost and summary."""

    label: str
    """Names its log files (``LOGS/LABEL.log``, ...)."""
    measured: Measured
    summary: dict[str, Any]
    events: dict[str, int]
    harness_rss_mb: float
    """The harness's own peak RSS (VmHWM) when it spawned the worker."""

    @property
    def process(self) -> ProcessRun:
        """The worker process's wall time, CPU and memory."""
        return self.measured.process

    @property
    def records(self) -> int:
        """Records the worker read."""
        return int(self.summary.get("records_read", 0))

    @property
    def elapsed_s(self) -> float:
        """The engine's own run time (from its summary): start-up and imports left out."""
        return float(self.summary.get("elapsed_s", math.nan))

    def to_json(self) -> dict[str, Any]:
        """Everything, derived figures included."""
        m = self.measured
        return asdict(m.process) | {
            "label": self.label,
            "cpu_s": m.process.cpu_s,
            "harness_rss_mb": self.harness_rss_mb,
            "summary": self.summary,
            "events": self.events,
            "sim_stats": m.sim_stats,
            "sim_cpu_s": m.sim_cpu_s,
            "others_cpu_s": m.others_cpu_s,
            "others_cpu_pct": m.others_cpu_pct,
            "load_before": m.load_before,
        }


def run_pair(
    source: Path,
    worker: WorkerConfig,
    sim_options: Sequence[str],
    *,
    label: str,
    timeout_s: float,
    prefix: Sequence[str] | None = None,
) -> WorkerRun:
    """A fresh simulator, ``contact-worker run`` on ``source`` against it, measured.

    ``prefix`` replaces the console script (e.g. ``python -m cProfile -o F -m worker.cli``).
    """
    log_path = LOGS / f"{label}.log"
    dead_letters = LOGS / f"{label}-dead-letters.jsonl"
    dead_letters.unlink(missing_ok=True)
    command = [*(prefix or cli_command()), *run_args(f"jsonl:{source}", dead_letters, worker)]
    harness_rss = status_mb("self", "VmHWM") or math.nan
    RESULTS.mkdir(parents=True, exist_ok=True)
    measured = measure(
        sim_options,
        LOGS / f"{label}-sim.log",
        lambda sim: run_process(
            command, log_path=log_path, timeout_s=timeout_s, env=worker_env(sim.url), cwd=RESULTS
        ),
        quiet=QUIET,
        note=log,
    )
    summary, events = worker_summary(measured.process, log_path)
    return WorkerRun(label, measured, summary, events, harness_rss)


def record(report: Report, run: WorkerRun, lines: int, changes: int, **facts: Any) -> None:
    """A run on an input of ``lines`` lines holding ``changes`` valid changes into the report,
    with ``facts`` and the problems :func:`check_run` finds."""
    problems = check_run(run, lines, changes)
    report.runs.append(run.to_json() | {"problems": problems, **facts})
    if problems:
        report.notes.append(f"{run.label}: " + "; ".join(problems))


def check_run(run: WorkerRun, lines: int, changes: int) -> list[str]:
    """Problems with a run that should have applied every change of a clean input.

    A busy machine counts as one: the figures of that run are not the worker's alone.
    """
    s = run.summary
    problems = []
    busy = run.measured.others_cpu_pct
    if busy > 100 * QUIET.threshold_cores:
        problems.append(f"other processes used {busy:.0f}% of a core meanwhile")
    if s.get("ending") != "drained":
        problems.append(f"ending {s.get('ending')}")
    if run.records != lines:
        problems.append(f"read {run.records} of {lines} records")
    if s.get("changes_applied") != changes:
        problems.append(f"applied {s.get('changes_applied')} of {changes} changes")
    if s.get("acked") != lines:
        problems.append(f"acked {s.get('acked')} of {lines}")
    dup = run.measured.sim_stats.get("duplicate_ids_in_a_request", 0)
    if dup:
        problems.append(f"{dup} requests with a duplicate ID")
    return problems


def cost_cells(run: WorkerRun) -> list[Any]:
    """wall s, engine s, changes/s (wall, engine): the columns every scenario's table opens with."""
    p = run.process
    return [
        round(p.wall_s, 3),
        run.elapsed_s,
        round(ratio(run.records, p.wall_s)),
        round(ratio(run.records, run.elapsed_s)),
    ]


def cpu_cells(run: WorkerRun) -> list[Any]:
    """worker CPU s, its % of wall, simulator CPU s, others' CPU %: who used the cores."""
    p, m = run.process, run.measured
    return [
        round(p.cpu_s, 2),
        round(100 * ratio(p.cpu_s, p.wall_s), 1),
        round(m.sim_cpu_s, 2),
        m.others_cpu_pct,
    ]


# -- reports ------------------------------------------------------------------------------------


@dataclass
class Report:
    """What a scenario found: its parameters, runs, tables, goals and free-text notes."""

    scenario: str
    params: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    goals: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def goal(self, name: str, value: float, target: str, met: bool) -> None:
        """Record a goal check."""
        self.goals.append({"goal": name, "value": value, "target": target, "met": met})

    def markdown(self) -> str:
        """All tables, the goals and the notes."""
        parts = [f"## pipeline {self.scenario}", ""]
        parts += [t.markdown() + "\n" for t in self.tables]
        if self.goals:
            goals = Table(
                "Goals",
                ["goal", "value", "target", "met"],
                [[g["goal"], g["value"], g["target"], g["met"]] for g in self.goals],
            )
            parts.append(goals.markdown() + "\n")
        parts += [f"- {note}" for note in self.notes]
        return "\n".join(parts).rstrip() + "\n"

    def publish(self) -> Path:
        """Print the Markdown on stdout and save the JSON; where it went."""
        print(self.markdown())
        return self.save()

    def save(self) -> Path:
        """Write benchmarks/results/pipeline-SCENARIO.json."""
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"pipeline-{self.scenario}.json"
        data = {
            "scenario": self.scenario,
            "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "params": self.params,
            "goals": self.goals,
            "tables": [asdict(t) for t in self.tables],
            "notes": self.notes,
            "runs": self.runs,
        }
        path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
        return path


def ratio(num: float, den: float) -> float:
    """num / den, NaN when den is 0 (a table cell, not a figure to reason on)."""
    return num / den if den else math.nan


def median_row(rows: Sequence[Sequence[Any]]) -> list[Any]:
    """A "median" row under ``rows``: per column, the median of its numbers (ints stay ints)."""
    cells: list[Any] = ["median"]
    for column in list(zip(*rows, strict=True))[1:]:
        numbers = [v for v in column if isinstance(v, int | float)]
        middle = statistics.median(numbers) if numbers else "-"
        if numbers and all(isinstance(v, int) for v in numbers) and middle == int(middle):
            middle = int(middle)
        cells.append(middle)
    return cells


# -- what-if runs -------------------------------------------------------------------------------


def worker_entry(code: str | None, name: str) -> list[str]:
    """How to start the worker's ``main()``: ``-m worker.cli``, or a script running ``code`` first.

    ``code`` (e.g. ``import gc; gc.disable()``) is for what-if experiments on the real command
    without touching ``worker/``; the script is written to benchmarks/results/NAME-what-if.py.
    The result follows ``python`` or ``python -m cProfile -o FILE``.
    """
    if not code:
        return ["-m", "worker.cli"]
    script = RESULTS / f"{name}-what-if.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(f"{code}\nimport sys\nfrom worker.cli import main\nsys.exit(main())\n")
    return [str(script)]


def what_if_prefix(code: str | None, name: str) -> list[str] | None:
    """The worker command for ``--what-if CODE``; None (the console script) without it."""
    return [sys.executable, *worker_entry(code, name)] if code else None


def report_name(args: argparse.Namespace) -> str:
    """The scenario's name, with ``--tag`` appended: names the JSON, log and profile files."""
    return f"{args.scenario}-{args.tag}" if args.tag else str(args.scenario)


def unwind_on_signals() -> None:
    """Make SIGTERM and SIGHUP unwind like Ctrl-C, so every child is stopped on the way out."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


# -- scenarios ----------------------------------------------------------------------------------


def clean_stream(changes: int, contacts: int, seed: int) -> tuple[StreamSpec, Path]:
    """A uniform stream without unknown IDs or invalid records, and its file (made once)."""
    spec = StreamSpec(
        changes=changes,
        contacts=contacts,
        unknown_share=0.0,
        invalid=0,
        distribution="uniform",
        seed=seed,
    )
    return spec, stream_file(spec, DATA, log)


def _unlimited(args: argparse.Namespace) -> tuple[StreamSpec, Path, WorkerConfig, Report]:
    """What the throughput, memory and profile scenarios start from: their stream (uniform,
    clean) and its file, a worker without a rate limit, and an empty report."""
    spec, source = clean_stream(args.changes, args.contacts, args.seed)
    worker = WorkerConfig(
        batch_size=args.batch_size,
        linger_ms=args.linger_ms,
        rate=0,
        concurrency=args.concurrency,
        max_waiting=args.max_waiting,
    )
    params = {**vars(args), "worker_options": worker_flags(worker), "source": str(source)}
    return spec, source, worker, Report(report_name(args), params)


def _unlimited_run(
    report: Report,
    args: argparse.Namespace,
    worker: WorkerConfig,
    spec: StreamSpec,
    path: Path,
    label: str,
    prefix: Sequence[str] | None = None,
    **facts: Any,
) -> WorkerRun:
    """One run of the throughput, memory or profile scenario, at zero latency, into the
    report; ``prefix`` (a profiler) replaces ``--what-if``'s."""
    log(f"{report.scenario} {label}: {spec.changes:,} changes over {spec.contacts:,} IDs")
    run = run_pair(
        path,
        worker,
        ["--latency", "0"],
        label=f"{report.scenario}-{label}",
        timeout_s=args.timeout,
        prefix=prefix or what_if_prefix(args.what_if, report.scenario),
    )
    record(report, run, spec.lines, spec.changes, **facts)
    return run


def scenario_throughput(args: argparse.Namespace) -> Report:
    """Changes/s through the whole pipeline at zero API latency and no rate limit."""
    spec, source, worker, report = _unlimited(args)
    rows = []
    for i in range(1, args.repeat + 1):
        run = _unlimited_run(report, args, worker, spec, source, f"{i}")
        rows.append(_throughput_row(str(i), run))
    if len(rows) > 1:
        rows.append(median_row(rows))
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
                "CPU s / 100k changes",
                "peak RSS MB",
                "worker CPU s",
                "worker CPU % of wall",
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
        *cost_cells(run),
        requests,
        round(ratio(requests, run.elapsed_s), 1),
        round(ratio(contacts, requests), 1),
        round(100 * ratio(int(s.get("coalesced", 0)), changes), 1),
        round(ratio(run.process.cpu_s, run.records) * 100_000, 3),
        round(run.process.peak_rss_mb, 1),
        *cpu_cells(run),
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
        worker = WorkerConfig(
            batch_size=args.batch_size,
            linger_ms=args.linger_ms,
            rate=worker_rate,
            concurrency=args.concurrency,
        )
        run = run_pair(
            source,
            worker,
            ["--latency", f"{args.latency:g}", "--rate-limit", f"{api_rate:g}"],
            label=label,
            timeout_s=args.timeout or 120 + 10 * least,
        )
        record(report, run, args.changes, args.changes, least_s=least)
        by_status = run.summary.get("requests_by_status", {})
        sim = run.measured.sim_stats
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
                round(run.process.wall_s, 2),
                round(engine_ratio, 3),
                round(ratio(run.process.wall_s, least), 3),
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
    spec, source, worker, report = _unlimited(args)
    small = StreamSpec(changes=1_000, contacts=1_000, unknown_share=0.0, invalid=0, seed=args.seed)
    baseline_source = stream_file(small, DATA, log)
    rows: list[list[Any]] = []
    rss: list[float] = []
    plan = [("baseline", small, baseline_source)]
    plan += [(f"memory-{i}", spec, source) for i in range(1, args.repeat + 1)]
    for label, this_spec, path in plan:
        run = _unlimited_run(report, args, worker, this_spec, path, label)
        p = run.process
        rss.append(round(p.peak_rss_mb, 1))
        rows.append(
            [
                label,
                this_spec.changes,
                this_spec.contacts,
                round(path.stat().st_size / 2**20, 1),
                round(p.peak_rss_mb, 1),
                round(p.ru_maxrss_mb, 1),
                round(run.harness_rss_mb, 1),
                *cost_cells(run),
                *cpu_cells(run),
                int(run.summary.get("requests", 0)),
            ]
        )
    if args.repeat > 1:
        rows.append(median_row(rows[1:]))
    report.tables.append(
        Table(
            f"memory: zero latency, rate 0, batch {args.batch_size}, concurrency "
            f"{args.concurrency}, max-waiting {args.max_waiting:,}",
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


def _profiled_row(name: str, run: WorkerRun) -> list[Any]:
    return [name, *cost_cells(run)[:3], round(run.process.cpu_s, 2)]


def _profiled(
    report: Report,
    args: argparse.Namespace,
    inputs: tuple[StreamSpec, Path, WorkerConfig],
    profiler: str,
    output: Path,
    command: Sequence[str],
) -> WorkerRun:
    """A throughput run as ``COMMAND OUTPUT [python] WORKER``, e.g. ``python -m cProfile -o``;
    checked to have written ``output``."""
    spec, source, worker = inputs
    output.unlink(missing_ok=True)
    entry = worker_entry(args.what_if, report.scenario)
    python = [] if command[0] == sys.executable else ["--", sys.executable]
    prefix = [*command, str(output), *python, *entry]
    label, facts = profiler.lower(), {"profiler": profiler, "output": str(output)}
    run = _unlimited_run(report, args, worker, spec, source, label, prefix, **facts)
    if not output.exists():
        raise BenchError(f"{profiler} wrote no {output}; log {run.process.log_path}")
    return run


def scenario_profile(args: argparse.Namespace) -> Report:
    """The throughput scenario under cProfile, and (if installed) sampled by py-spy."""
    spec, source, worker, report = _unlimited(args)
    name = report.scenario
    RESULTS.mkdir(parents=True, exist_ok=True)
    profiled: list[list[Any]] = []
    sections: list[str] = []
    if not args.no_cprofile:
        prof = RESULTS / f"{name}.prof"
        command = [sys.executable, "-m", "cProfile", "-o"]
        run = _profiled(report, args, (spec, source, worker), "cProfile", prof, command)
        profiled.append(_profiled_row("cProfile", run))
        tables, text = cprofile_tables(prof, args.top)
        report.tables += tables
        sections += [t.markdown() for t in tables] + [text]
    spy = None if args.no_py_spy else py_spy_path()
    if spy is None:
        report.notes.append("py-spy not installed or --no-py-spy: no sampling run.")
    else:
        raw = RESULTS / f"{name}-py-spy.txt"
        command = [str(spy), "record", "--rate", str(args.spy_rate), "--format", "raw"]
        command += ["--nolineno", *(["--native"] if args.native else []), "--output"]
        spied = _profiled(report, args, (spec, source, worker), "py-spy", raw, command)
        profiled.append(_profiled_row("py-spy", spied))
        spy_tables = py_spy_tables(raw, args.top, spied.process.wall_s, args.spy_rate)
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
    report.notes.append(f"full listings in {out}")
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
        p.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING)
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
    p.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING)
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
    byte_compile(ROOT / "worker")  # the worker as installed: no compiling at each start
    QUIET.max_wait_s = args.quiet_wait
    try:
        report = SCENARIOS[args.scenario](args)
    except BenchError as exc:
        print(f"pipeline {args.scenario}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pipeline {args.scenario}: interrupted", file=sys.stderr)
        return 130
    log(f"wrote {report.publish()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
