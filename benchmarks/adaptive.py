"""Adaptive concurrency and reading a backlog ahead (issue 12, parts 3 and 6): the real
``contact-worker run`` against ``contact-worker simulate``, each in its own process.

Scenarios
---------
auto
    ``--concurrency auto --max-concurrency M`` at a fixed API latency (50 ms and 200 ms), no
    rate limit, on a backlog of distinct IDs (nothing coalesces, so every request is full and
    the same in every run): requests/s over the engine's run time against what M in flight
    allow by Little's law (M / latency), and against a fixed ``--concurrency M`` run in the
    same round. Goal: >= 0.9 of Little's law.
rate
    ``--concurrency auto`` at a rate limit (API and worker at R/s, 50 and 200 ms): the highest
    limit any answer left (the summary's ``concurrency_highest``) and the most requests the
    simulator saw at once, against what the rate needs (R x latency). Goal: the limit never
    above what the rate needs with the controller's headroom (R x latency x 1.5 + 1).
backlog
    A rate-limited backlog that coalesces: 60,000 changes over 40,000 IDs (uniform), API and
    worker at 20 requests/s; and 1,000,000 changes over 200,000 IDs without a rate limit.
    Requests against the fewest that carry the work (changed IDs / batch size, rounded up).
    Goal (rate-limited): <= 1.02 x the fewest.

Each scenario runs ``--rounds`` rounds (default 3) and reports every round and the median, with
the load average before each run. Usage::

    .venv/bin/python benchmarks/adaptive.py auto|rate|backlog [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from pipeline import DATA, LOGS, RESULTS, distinct_file

from worker.bench.harness import run_args, stream_file, worker_summary
from worker.bench.processes import Quiet, cli_command, measure, run_process, worker_env
from worker.bench.scenario import WorkerConfig
from worker.sim.stream import StreamSpec

NO_WAIT = Quiet(max_wait_s=0.0)
"""The build machine is shared: runs are not held back for a quiet machine; the load
average before each run is reported instead."""


def log(message: str) -> None:
    """Progress notes go to stderr; stdout holds the Markdown report."""
    print(f"[adaptive] {message}", file=sys.stderr, flush=True)


def run_worker(
    source: Path,
    worker: WorkerConfig,
    extra: Sequence[str],
    sim_options: Sequence[str],
    label: str,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """One ``contact-worker run`` (its flags, then ``extra``) against a fresh simulator."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"adaptive-{label}.log"
    dead = LOGS / f"adaptive-{label}-dead.jsonl"
    dead.unlink(missing_ok=True)
    command = [
        *cli_command(),
        *run_args(f"jsonl:{source}", dead, worker),
        "--progress-interval",
        "0.5",
        *extra,
    ]
    load = os.getloadavg()[0]
    measured = measure(
        sim_options,
        LOGS / f"adaptive-{label}-sim.log",
        lambda sim: run_process(
            command, log_path=log_path, timeout_s=timeout_s, env=worker_env(sim.url), cwd=RESULTS
        ),
        quiet=NO_WAIT,
        note=log,
    )
    summary, _ = worker_summary(measured.process, log_path)
    limits = [
        int(event["concurrency_limit"])
        for event in map(orjson.loads, log_path.read_bytes().splitlines())
        if event.get("event") == "progress" and "concurrency_limit" in event
    ]
    return {
        "label": label,
        "load_1m": load,
        "summary": summary,
        "sim": measured.sim_stats,
        "limits": limits,
        "wall_s": measured.process.wall_s,
    }


def changed_ids(path: Path) -> int:
    """Distinct IDs in a JSONL file of changes (the fewest requests x batch size)."""
    return len({str(orjson.loads(line)["ID"]) for line in path.read_bytes().splitlines()})


def median(values: Sequence[float]) -> float:
    """The median, rounded for the report."""
    return round(statistics.median(values), 3)


def scenario_auto(args: argparse.Namespace) -> list[str]:
    """--concurrency auto at 50 and 200 ms against Little's law and a fixed M."""
    out = [
        f"### auto: --max-concurrency {args.max_concurrency}, batch {args.batch_size}, no rate"
        " limit, distinct IDs",
        "",
        "| latency | round | load | run | requests | engine s | requests/s | Little's law"
        " (M / latency) | ratio | final limit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    medians = []
    for latency_ms in (50, 200):
        bound = args.max_concurrency / (latency_ms / 1000)
        changes = int(bound * args.batch_size * args.seconds)
        source = distinct_file(changes, seed=11)
        worker = WorkerConfig(batch_size=args.batch_size, linger_ms=5, rate=0, concurrency=8)
        ratios: dict[str, list[float]] = {"auto": [], "fixed": []}
        for round_ in range(1, args.rounds + 1):
            for kind, extra in (
                ("auto", ["--concurrency", "auto", "--max-concurrency", str(args.max_concurrency)]),
                ("fixed", ["--concurrency", str(args.max_concurrency)]),
            ):
                label = f"auto-{latency_ms}ms-{kind}-r{round_}"
                log(f"{label}: {changes:,} distinct changes, bound {bound:.0f} requests/s")
                run = run_worker(source, worker, extra, ["--latency", str(latency_ms)], label)
                s = run["summary"]
                rps = s["requests"] / s["elapsed_s"]
                ratios[kind].append(rps / bound)
                final = s["concurrency_limit"]
                out.append(
                    f"| {latency_ms} ms | {round_} | {run['load_1m']:.2f} | {kind} |"
                    f" {s['requests']} | {s['elapsed_s']:.2f} | {rps:.1f} | {bound:.0f} |"
                    f" {rps / bound:.3f} | {final} |"
                )
        pairs = zip(ratios["auto"], ratios["fixed"], strict=True)
        against_fixed = median([a / f for a, f in pairs])
        medians.append(
            f"- {latency_ms} ms: median ratio to Little's law, auto {median(ratios['auto'])},"
            f" fixed --concurrency {args.max_concurrency} {median(ratios['fixed'])};"
            f" auto / fixed {against_fixed}"
        )
    return [*out, "", *medians]


def scenario_rate(args: argparse.Namespace) -> list[str]:
    """--concurrency auto at a rate limit: the limit against what the rate needs, and the
    drain against a fixed --concurrency 8 (the default) in the same round."""
    rate = args.rate
    changes = int(rate * args.batch_size * args.seconds)
    source = distinct_file(changes, seed=12)
    worker = WorkerConfig(batch_size=args.batch_size, linger_ms=5, rate=rate, concurrency=8)
    out = [
        f"### rate: API and worker at {rate:g} requests/s, --concurrency auto"
        f" --max-concurrency {args.max_concurrency}, against --concurrency 8",
        "",
        "| latency | round | load | run | requests | 429s | engine s | requests/s | highest"
        " limit | most in flight at the API | round trip s | rate x round trip x 1.5 + 1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    within, times = [], []
    for latency_ms, round_ in itertools.product((50, 200), range(1, args.rounds + 1)):
        elapsed = {}
        for kind, extra in (
            ("auto", ["--concurrency", "auto", "--max-concurrency", str(args.max_concurrency)]),
            ("fixed 8", ["--concurrency", "8"]),
        ):
            label = f"rate-{latency_ms}ms-{kind.replace(' ', '')}-r{round_}"
            sim = ["--latency", str(latency_ms), "--rate-limit", f"{rate:g}"]
            run = run_worker(source, worker, extra, sim, label)
            s = run["summary"]
            elapsed[kind] = s["elapsed_s"]
            highest, cap, rtt = "", "", ""
            if "concurrency_highest" in s:
                highest, rtt = int(s["concurrency_highest"]), float(s["round_trip_s"])
                cap = math.ceil(rate * rtt * 1.5 + 1)
                within.append(highest <= cap)
            out.append(
                f"| {latency_ms} ms | {round_} | {run['load_1m']:.2f} | {kind} | {s['requests']} |"
                f" {s['requests_by_status'].get('429', 0)} | {s['elapsed_s']:.2f} |"
                f" {s['requests'] / s['elapsed_s']:.1f} | {highest} |"
                f" {run['sim']['max_in_flight']} | {rtt} | {cap} |"
            )
        times.append(elapsed["auto"] / elapsed["fixed 8"])
    return [
        *out,
        "",
        f"- the highest limit within rate x round trip x 1.5 + 1 in every round: {all(within)};"
        f" drain time auto / fixed 8 (median): {median(times)}",
    ]


def scenario_backlog(args: argparse.Namespace) -> list[str]:
    """Requests against the fewest for a backlog that coalesces."""
    out = [
        "### backlog: requests against the fewest (changed IDs / batch 100)",
        "",
        "| backlog | rate | round | load | requests | fewest | ratio | engine s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cases = [(60_000, 40_000, 20.0, 21), (1_000_000, 200_000, 0.0, 4)]
    if args.only_rate_limited:
        cases = cases[:1]
    notes = []
    for changes, contacts, rate, seed in cases:
        spec = StreamSpec(
            changes=changes, contacts=contacts, unknown_share=0.0, invalid=0, seed=seed
        )
        source = stream_file(spec, DATA, log)
        fewest = math.ceil(changed_ids(source) / 100)
        worker = WorkerConfig(batch_size=100, linger_ms=50, rate=rate, concurrency=8)
        sim = ["--latency", "exp:20"] + (["--rate-limit", f"{rate:g}"] if rate else [])
        ratios = []
        for round_ in range(1, args.rounds + 1):
            label = f"backlog-{changes}-r{round_}"
            log(f"{label}: {changes:,} changes over {contacts:,} IDs, fewest {fewest}")
            run = run_worker(source, worker, [], sim, label)
            s = run["summary"]
            requests = s["requests_by_status"].get("204", 0)
            ratios.append(requests / fewest)
            out.append(
                f"| {changes:,} over {contacts:,} | {rate:g} | {round_} | {run['load_1m']:.2f} |"
                f" {requests} | {fewest} | {requests / fewest:.3f} | {s['elapsed_s']:.2f} |"
            )
        notes.append(f"- {changes:,} over {contacts:,}: median ratio {median(ratios)}")
    return [*out, "", *notes]


SCENARIOS = {"auto": scenario_auto, "rate": scenario_rate, "backlog": scenario_backlog}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one scenario; print its Markdown report and save it to benchmarks/results/."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-concurrency", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--seconds", type=float, default=10.0, help="drain length at the bound")
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--only-rate-limited", action="store_true")
    args = p.parse_args(argv)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## {args.scenario} ({started}, {os.cpu_count()} cores)", ""]
    lines += SCENARIOS[args.scenario](args)
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"adaptive-{args.scenario}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
