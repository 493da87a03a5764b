"""The hot path on one core against yardsticks measured in the same run (issue 15).

The job: 1,000,000 changes over 200,000 IDs from a file (uniform, every ID known), zero API
latency, batch 100, no rate limit, concurrency 8. The process under test is pinned to core 0
(``taskset -c 0``), the simulator to core 1, so that the figure is one core's worth of work.

Each round runs, in this order and on the same input:

* ``contact-worker run`` (the shipped command: start-up and imports included);
* ``reference_worker.py``, a careful single-file worker (coalesces, one request in flight per
  ID, isolates unknown IDs; no metrics, checkpoints or dead-letter file). It bounds the IDs it
  holds (200,000: here, the whole file), so it merges every change of an ID into one request;
* the same careful worker bounding the *changes* it holds, as contact-worker does
  (``--bound changes``, 200,000): the same window of merging, hence about as many requests;
* the bare loop, in this process pinned to core 0: one ``orjson.loads`` per line, a dict merge
  per ID, one ``orjson.dumps`` per 100 contacts. No I/O beyond reading the file.

Reported per round: changes/s (records / wall time of the process), CPU s per 100,000 changes,
peak RSS (VmHWM), and the worker's ratios to the yardsticks; the medians over ``--rounds``.
A ratio taken within one round holds up on a loaded machine far better than a raw figure.

    .venv/bin/python benchmarks/hotpath.py [--changes 1000000] [--contacts 200000] [--rounds 3]
    .venv/bin/python benchmarks/hotpath.py --sizes 100000,1000000,5000000   # CPU growth

Writes benchmarks/results/hotpath.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from pipeline import LOGS, RESULTS, clean_stream, log, ratio, what_if_prefix

from worker.bench.harness import run_args, worker_summary
from worker.bench.processes import (
    BIN,
    Quiet,
    byte_compile,
    cli_command,
    machine,
    measure,
    run_process,
    worker_env,
)
from worker.bench.report import Table
from worker.bench.scenario import WorkerConfig

HERE = Path(__file__).resolve().parent
GOAL_CHANGES_PER_S = 160_000
GOAL_CPU_PER_100K_S = 0.6
GOAL_RSS_MB = 150.0
WORKER_CORE, SIM_CORE = 0, 1


def pinned(core: int) -> list[str]:
    return ["taskset", "-c", str(core)]


def run_pinned(command: Sequence[str], label: str, timeout_s: float, quiet: Quiet) -> Any:
    """``command`` on core 0 against a fresh simulator on core 1."""

    def run(sim: Any) -> Any:
        os.sched_setaffinity(sim.proc.pid, {SIM_CORE})
        return run_process(
            [*pinned(WORKER_CORE), *command],
            log_path=LOGS / f"{label}.log",
            timeout_s=timeout_s,
            env=worker_env(sim.url),
            cwd=RESULTS,
        )

    return measure(["--latency", "0"], LOGS / f"{label}-sim.log", run, quiet=quiet, note=log)


def summary_of(log_path: Path) -> dict[str, Any]:
    """The last ``"event": "summary"`` JSON line of a log."""
    found: dict[str, Any] = {}
    for line in log_path.read_bytes().splitlines():
        if b'"summary"' in line:
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if event.get("event") == "summary":
                found = event
    return found


def bare_loop(path: Path, batch: int = 100) -> tuple[float, float, int]:
    """Wall s, CPU s and lines of the least a worker must do, on core 0, in this process."""
    os.sched_setaffinity(0, {WORKER_CORE})
    gc.collect()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    waiting: dict[object, dict[str, Any]] = {}
    sent = lines = 0
    loads, dumps = orjson.loads, orjson.dumps
    with open(path, "rb") as f:
        rest = b""
        while chunk := f.read(1 << 18):
            parts = (rest + chunk).split(b"\n")
            rest = parts.pop()
            for line in parts:
                obj = loads(line)
                lines += 1
                merged = waiting.get(obj["ID"])
                if merged is None:
                    waiting[obj["ID"]] = obj
                else:
                    merged.update(obj)
                if len(waiting) >= 20_000:  # drain, as a bounded worker must
                    bodies = list(waiting.values())
                    waiting.clear()
                    for i in range(0, len(bodies), batch):
                        sent += len(dumps(bodies[i : i + batch]))
    bodies = list(waiting.values())
    for i in range(0, len(bodies), batch):
        sent += len(dumps(bodies[i : i + batch]))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return wall, cpu, lines


def one_round(path: Path, lines: int, args: argparse.Namespace, number: int) -> dict[str, Any]:
    quiet = Quiet(max_wait_s=args.quiet_wait)
    worker = WorkerConfig(batch_size=100, linger_ms=5, rate=0, concurrency=8)
    dead = LOGS / f"hotpath-{number}-dead-letters.jsonl"
    dead.unlink(missing_ok=True)
    entry = what_if_prefix(args.what_if, "hotpath") or cli_command()
    command = [*entry, *run_args(f"jsonl:{path}", dead, worker)]
    w = run_pinned(command, f"hotpath-worker-{number}", args.timeout, quiet)
    summary, _ = worker_summary(w.process, Path(w.process.log_path))
    python = str(BIN / "python") if (BIN / "python").exists() else sys.executable
    reference = [python, str(HERE / "reference_worker.py"), str(path), "--batch-size", "100"]
    r, rb = (
        (w, w)
        if args.no_yardsticks
        else (
            run_pinned(reference, f"hotpath-ref-{number}", args.timeout, quiet),
            run_pinned(
                [*reference, "--bound", "changes"],
                f"hotpath-ref-bounded-{number}",
                args.timeout,
                quiet,
            ),
        )
    )
    for ref in (r, rb):
        ref_summary = summary_of(Path(ref.process.log_path))
        if ref.process.returncode != 0 or ref_summary.get("records_read") != lines:
            raise SystemExit(f"reference worker failed: see {ref.process.log_path}")
    bare_wall, bare_cpu, bare_lines = (1.0, 1.0, lines) if args.no_yardsticks else bare_loop(path)
    if summary.get("records_read") != lines or summary.get("ending") != "drained":
        raise SystemExit(f"worker did not drain {lines} records: {summary}")
    wp, rp, bp = w.process, r.process, rb.process
    return {
        "lines": lines,
        "load_before": w.load_before,
        "others_cpu_pct": max(w.others_cpu_pct, r.others_cpu_pct, rb.others_cpu_pct),
        "worker": {
            "wall_s": wp.wall_s,
            "cpu_s": wp.cpu_s,
            "rss_mb": wp.peak_rss_mb,
            "requests": w.sim_stats.get("requests"),
            "engine_s": summary.get("elapsed_s"),
        },
        "reference": {
            "wall_s": rp.wall_s,
            "cpu_s": rp.cpu_s,
            "rss_mb": rp.peak_rss_mb,
            "requests": r.sim_stats.get("requests"),
        },
        "bounded": {
            "wall_s": bp.wall_s,
            "cpu_s": bp.cpu_s,
            "rss_mb": bp.peak_rss_mb,
            "requests": rb.sim_stats.get("requests"),
        },
        "bare": {"wall_s": bare_wall, "cpu_s": bare_cpu, "lines": bare_lines},
    }


def row(name: str, lines: int, run: dict[str, Any]) -> list[Any]:
    return [
        name,
        round(ratio(lines, run["wall_s"])),
        round(100_000 * ratio(run["cpu_s"], lines), 3),
        round(run["rss_mb"], 1) if "rss_mb" in run else "-",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=1_000_000)
    parser.add_argument("--contacts", type=int, default=200_000)
    parser.add_argument("--sizes", default="", help="comma-separated change counts (CPU growth)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--quiet-wait", type=float, default=30.0)
    parser.add_argument("--what-if", help="Python run in the worker before main() (experiments)")
    parser.add_argument("--no-yardsticks", action="store_true", help="the worker only")
    args = parser.parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs 2 cores: the worker on one, the simulator on the other")
    sizes = [int(s) for s in args.sizes.split(",") if s] or [args.changes]
    byte_compile(HERE.parent / "worker")  # as installed: no compiling at each start
    report: dict[str, Any] = {
        "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "params": vars(args),
        "sizes": {},
    }
    print(f"## hot path, one core ({report['at']})\n")
    for changes in sizes:
        contacts = max(1, args.contacts * changes // args.changes)
        _, path = clean_stream(changes, contacts, args.seed)
        rounds = []
        for number in range(1, args.rounds + 1):
            log(f"{changes:,} changes: round {number} of {args.rounds}")
            rounds.append(one_round(path, changes, args, number))
        rows, ratios = [], []
        for i, result in enumerate(rounds, 1):
            w, r, b = result["worker"], result["reference"], result["bare"]
            rb = result["bounded"]
            rows += [
                [f"{i}: contact-worker", *row("", changes, w)[1:], w["requests"]],
                [f"{i}: reference", *row("", changes, r)[1:], r["requests"]],
                [f"{i}: reference, changes bound", *row("", changes, rb)[1:], rb["requests"]],
                [f"{i}: bare loop", *row("", changes, b)[1:], "-"],
            ]
            ratios.append(
                [
                    i,
                    round(ratio(r["cpu_s"], w["cpu_s"]), 3),
                    round(ratio(rb["cpu_s"], w["cpu_s"]), 3),
                    round(ratio(b["cpu_s"], w["cpu_s"]), 3),
                    round(ratio(r["wall_s"], w["wall_s"]), 3),
                    result["load_before"],
                    round(result["others_cpu_pct"]),
                ]
            )
        med_w = {k: statistics.median(x["worker"][k] for x in rounds) for k in ("wall_s", "cpu_s")}
        med_rss = statistics.median(x["worker"]["rss_mb"] for x in rounds)
        summary = {
            "changes_per_s": round(ratio(changes, med_w["wall_s"])),
            "cpu_per_100k_s": round(100_000 * ratio(med_w["cpu_s"], changes), 3),
            "rss_mb": round(med_rss, 1),
            "cpu_vs_reference": statistics.median(x[1] for x in ratios),
            "cpu_vs_bounded_reference": statistics.median(x[2] for x in ratios),
            "cpu_vs_bare": statistics.median(x[3] for x in ratios),
        }
        report["sizes"][changes] = {"rounds": rounds, "median": summary}
        print(
            Table(
                f"{changes:,} changes over {contacts:,} IDs, pinned to one core",
                ["run", "changes/s", "CPU s / 100k", "peak RSS MB", "requests"],
                rows,
            ).markdown()
            + "\n"
        )
        print(
            Table(
                "ratios within each round (reference or bare CPU / worker CPU; >1: worker cheaper)",
                [
                    "round",
                    "reference/worker CPU",
                    "bounded reference/worker CPU",
                    "bare/worker CPU",
                    "reference/worker wall",
                    "load before",
                    "others' CPU %",
                ],
                ratios,
            ).markdown()
            + "\n"
        )
        print(f"median: {summary}\n")
    if len(sizes) > 1:
        per = [report["sizes"][n]["median"]["cpu_per_100k_s"] for n in sizes]
        growth = ratio(per[-1], per[0]) - 1
        print(f"CPU per change from {sizes[0]:,} to {sizes[-1]:,}: {100 * growth:+.1f}%\n")
        report["cpu_growth"] = growth
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "hotpath.json"
    out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
