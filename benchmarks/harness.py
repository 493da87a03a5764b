"""The machinery under the benchmarks: processes, measurements, input files and reports.

Used by ``pipeline.py`` (the end-to-end scenarios) and ``stages.py`` (per-stage costs). What
is measured, and how, is explained in ``pipeline.py``'s docstring.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from worker.bench.harness import read_log
from worker.bench.processes import (  # shared with `contact-worker bench`
    BenchError,
    PeakWatcher,
    Quiet,
    SimulatorProcess,
    clean_env,
    cli_command,
    die_with_harness,
    machine,
    proc_cpu_s,
    status_mb,
    system_busy_s,
)
from worker.sim.stream import StreamSpec, generate_lines, write_file

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DATA = RESULTS / "data"
LOGS = RESULTS / "logs"
BIN = Path(sys.executable).parent
CLIENT_ID, CLIENT_SECRET = "demo", "demo-secret"


# -- commands -----------------------------------------------------------------------------------


def py_spy_path() -> Path | None:
    """py-spy next to the interpreter or on PATH, if installed."""
    local = BIN / "py-spy"
    if local.exists():
        return local
    found = shutil.which("py-spy")
    return Path(found) if found else None


# -- input files --------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)
    return path


def stream_file(spec: StreamSpec) -> Path:
    """A cached JSONL file of the stream ``spec`` describes (generated on first use)."""
    name = (
        f"stream-{spec.changes}c-{spec.contacts}ids-{spec.distribution}"
        f"-u{spec.unknown_share:g}-i{spec.invalid}-s{spec.seed}.jsonl"
    )
    path = DATA / name
    if path.exists():
        return path
    started = time.perf_counter()
    _atomic_write(path, lambda tmp: write_file(spec, tmp))
    log(f"generated {path.name} in {time.perf_counter() - started:.1f} s")
    return path


def distinct_file(count: int, seed: int = 1) -> Path:
    """A cached JSONL file of ``count`` realistic changes to IDs 1..count, each ID exactly once.

    The field values come from the stream generator; only the IDs are rewritten (keeping the
    generator's mix of string and integer IDs), so nothing can coalesce.
    """
    path = DATA / f"distinct-{count}c-s{seed}.jsonl"
    if path.exists():
        return path
    spec = StreamSpec(changes=count, contacts=count, unknown_share=0.0, invalid=0, seed=seed)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            for number, line in enumerate(generate_lines(spec), start=1):
                obj = orjson.loads(line)
                obj["ID"] = number if type(obj["ID"]) is int else str(number)
                out.write(orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE))

    return _atomic_write(path, write)


# -- processes ----------------------------------------------------------------------------------


def log(message: str) -> None:
    """Progress notes go to stderr, so stdout holds only the Markdown report."""
    print(f"[pipeline] {message}", file=sys.stderr, flush=True)


@dataclass
class WorkerRun:
    """One finished worker process: what it cost and what it said."""

    command: list[str]
    returncode: int
    wall_s: float
    user_s: float
    sys_s: float
    peak_rss_mb: float
    """The worker's VmHWM, polled; see the module docstring."""
    ru_maxrss_mb: float
    """wait4's ru_maxrss: at least the harness's peak RSS at the fork, whatever the worker used."""
    harness_rss_mb: float
    """The harness's own peak RSS (VmHWM) when it spawned the worker."""
    summary: dict[str, Any]
    events: dict[str, int]
    log_path: str
    sim_stats: dict[str, Any] = field(default_factory=dict)
    sim_cpu_s: float | None = None
    """CPU seconds the simulator used during the run."""
    other_cpu_s: float | None = None
    """CPU seconds other processes used during the run: noise if much above 0."""
    load_before: float | None = None
    """Cores other processes used just before the run."""

    @property
    def other_cpu_pct(self) -> float | None:
        """Other processes' CPU during the run, in % of one core."""
        if self.other_cpu_s is None:
            return None
        return round(100 * self.other_cpu_s / self.wall_s, 1)

    @property
    def cpu_s(self) -> float:
        """User + system CPU seconds of the worker process."""
        return self.user_s + self.sys_s

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
        data = asdict(self)
        data["cpu_s"] = self.cpu_s
        data["other_cpu_pct"] = self.other_cpu_pct
        return data


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def run_worker(
    api_url: str,
    source: Path,
    options: Sequence[str],
    *,
    label: str,
    timeout_s: float,
    prefix: Sequence[str] | None = None,
) -> WorkerRun:
    """Run ``contact-worker run`` to its end on ``source``; raise BenchError unless it exits 0.

    ``prefix`` replaces the console script (e.g. ``python -m cProfile -o F -m worker.cli``).
    Wall time runs from just before the spawn to the moment ``os.wait4`` reaps the process.
    """
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"{label}.log"
    dlq = LOGS / f"{label}-dead-letters.jsonl"
    dlq.unlink(missing_ok=True)
    command = [
        *(prefix if prefix is not None else cli_command()),
        "run",
        "--source",
        f"jsonl:{source}",
        "--dlq",
        f"jsonl:{dlq}",
        "--http-port",
        "0",
        "--log-format",
        "json",
        "--log-level",
        "info",
        *options,
    ]
    env = clean_env() | {
        "SMSGW_CLIENT_ID": CLIENT_ID,
        "SMSGW_CLIENT_SECRET": CLIENT_SECRET,
        "SMSGW_API_URL": api_url,
    }
    reaped: dict[str, Any] = {}
    harness_rss = status_mb("self", "VmHWM") or math.nan
    with open(log_path, "wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=out,
            env=env,
            cwd=RESULTS,
            preexec_fn=die_with_harness,
        )
        watcher = PeakWatcher(proc.pid)

        def reap() -> None:
            _, status, usage = os.wait4(proc.pid, 0)
            reaped.update(ended=time.perf_counter(), status=status, usage=usage)

        waiter = threading.Thread(target=reap, daemon=True)
        waiter.start()
        try:
            waiter.join(timeout_s)
            timed_out = waiter.is_alive()
        finally:  # a timeout, or Ctrl-C/SIGTERM while waiting: the worker must not outlive us
            if waiter.is_alive():
                # os.kill, not proc.kill(): Popen would poll, racing the thread for the reap.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                waiter.join(10)
            proc.returncode = -signal.SIGKILL
            peak = watcher.stop()
        if timed_out:
            raise BenchError(f"worker {label} still running after {timeout_s:.0f} s: killed")
    proc.returncode = os.waitstatus_to_exitcode(reaped["status"])
    usage = reaped["usage"]
    summary, events = read_log(log_path)
    if proc.returncode != 0:
        raise BenchError(
            f"worker {label} exited {proc.returncode}; log {log_path}:\n{_tail(log_path)}"
        )
    if not summary:
        raise BenchError(f"worker {label} logged no summary; log {log_path}:\n{_tail(log_path)}")
    return WorkerRun(
        command=command,
        returncode=proc.returncode,
        wall_s=reaped["ended"] - started,
        user_s=usage.ru_utime,
        sys_s=usage.ru_stime,
        peak_rss_mb=peak if peak is not None else usage.ru_maxrss / 1024,
        ru_maxrss_mb=usage.ru_maxrss / 1024,
        harness_rss_mb=harness_rss,
        summary=summary,
        events=events,
        log_path=str(log_path),
    )


QUIET = Quiet(max_wait_s=120.0)
"""Set from the command line in main()."""


def run_pair(
    source: Path,
    worker_options: Sequence[str],
    sim_options: Sequence[str],
    *,
    label: str,
    timeout_s: float,
    prefix: Sequence[str] | None = None,
) -> WorkerRun:
    """A fresh simulator, one worker run against it, the simulator's stats, the simulator gone.

    Also measures the CPU that other processes used meanwhile (``other_cpu_s``): all busy CPU
    of the machine less the worker's, the simulator's and the harness's.
    """
    with SimulatorProcess(sim_options, LOGS / f"{label}-sim.log") as sim:
        load_before = QUIET.wait(log)
        assert sim.proc is not None
        sim_before = proc_cpu_s(sim.proc.pid) or 0.0
        busy_before, own_before = system_busy_s(), _own_cpu_s()
        run = run_worker(
            sim.url, source, worker_options, label=label, timeout_s=timeout_s, prefix=prefix
        )
        busy, own = system_busy_s() - busy_before, _own_cpu_s() - own_before
        sim_cpu = (proc_cpu_s(sim.proc.pid) or 0.0) - sim_before
        run.sim_stats = sim.stats()
        run.sim_cpu_s = sim_cpu
        run.other_cpu_s = max(0.0, busy - run.cpu_s - sim_cpu - own)
        run.load_before = load_before
    return run


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def check_run(run: WorkerRun, lines: int, changes: int) -> list[str]:
    """Problems with a run that should have applied every change of a clean input.

    A busy machine counts as one: the figures of that run are not the worker's alone.
    """
    s = run.summary
    problems = []
    busy = run.other_cpu_pct
    if busy is not None and busy > 100 * QUIET.threshold_cores:
        problems.append(f"other processes used {busy:.0f}% of a core meanwhile")
    if s.get("ending") != "drained":
        problems.append(f"ending {s.get('ending')}")
    if run.records != lines:
        problems.append(f"read {run.records} of {lines} records")
    if s.get("changes_applied") != changes:
        problems.append(f"applied {s.get('changes_applied')} of {changes} changes")
    if s.get("acked") != lines:
        problems.append(f"acked {s.get('acked')} of {lines}")
    dup = run.sim_stats.get("duplicate_ids_in_a_request", 0)
    if dup:
        problems.append(f"{dup} requests with a duplicate ID")
    return problems


def worker_options(
    *, batch: int, linger_ms: float, rate: float, concurrency: int, max_waiting: int | None
) -> list[str]:
    """The ``run`` flags the scenarios vary."""
    options = [
        "--batch-size",
        str(batch),
        "--linger-ms",
        f"{linger_ms:g}",
        "--rate",
        f"{rate:g}",
        "--concurrency",
        str(concurrency),
    ]
    if max_waiting is not None:
        options += ["--max-waiting", str(max_waiting)]
    return options


# -- reporting ----------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: thousands separators for big numbers, ``digits`` decimals for small ones."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


@dataclass
class Table:
    """A titled Markdown table."""

    title: str
    headers: list[str]
    rows: list[list[Any]]

    def markdown(self) -> str:
        """The table as GitHub Markdown."""
        cells = [[fmt(c) for c in row] for row in self.rows]
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.headers) + " |")
        lines.append("|" + "|".join("---" for _ in self.headers) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)


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


def ratio(num: float, den: float) -> float:
    """num / den, NaN when den is 0."""
    return num / den if den else math.nan


def median_cell(values: Sequence[Any]) -> Any:
    """The median of the numbers in a table column; ints stay ints."""
    numbers = [v for v in values if isinstance(v, int | float)]
    if not numbers:
        return "-"
    middle = statistics.median(numbers)
    if all(isinstance(v, int) for v in numbers) and middle == int(middle):
        return int(middle)
    return middle


def unwind_on_signals() -> None:
    """Make SIGTERM and SIGHUP unwind like Ctrl-C, so every child is stopped on the way out."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
