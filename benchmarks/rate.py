"""Rate benchmarks (issue 12): the real ``contact-worker run`` against ``contact-worker simulate``
with a hidden rate limit, each in its own process.

Scenarios
---------
exact
    ``--rate R`` equal to the API's limit R (R = 5, 20, 100 by default), a backlog of
    ``R * seconds`` changes to distinct IDs sent one per request (``--batch-size 1``), so the
    least the rate allows is exactly ``requests / R`` seconds. Reports the answers 429, the most
    requests the API saw in any one second, and ``least / wall`` (the process's wall time, from
    spawn to exit: start-up, the start-up check and the last answer included) and
    ``least / engine`` (the engine's ``elapsed_s``). Goal: 0 answers 429 (at most 1),
    ``least / wall >= 0.97``.
auto
    ``--rate auto --max-rate 200`` against a limit the worker is not told (R = 5, 20, 100).
    Reports, from the
    30th second on (the simulator counts each second), the API's rate used (2xx per second / R)
    and the share of requests answered 429; and the rate the worker learned (its last
    ``progress`` event). Goal: >= 0.95 used, <= 2 % answered 429.
replicas
    Three replicas (``contact-worker run`` processes) on one partitioned ``redis://`` or
    ``postgresql://`` input with ``--rate R`` against an API limited to R: the share of 429s
    and the rate the three used together (2xx per second / R, over the seconds all were busy).
    Goal: <= 2 % answered 429, >= 0.9 of R. With ``--auto``: ``--rate auto`` on each replica
    against the hidden limit, counted from the 30th second.

The API's limit is a token bucket of R tokens refilled at R/s answering 429 with
``Retry-After`` (the gateway of the issue) unless ``--window sliding`` (at most R in any one
second). Each run is repeated ``--rounds`` times; the report gives every round and the median,
and the load average before and after. Results go to ``benchmarks/reports/rate/``.

Usage::

    .venv/bin/python benchmarks/rate.py exact [--rates 5,20,100] [--seconds 40] [--rounds 3]
    .venv/bin/python benchmarks/rate.py auto [--rates 5,20,100] [--seconds 75]
    .venv/bin/python benchmarks/rate.py replicas [--inputs redis,postgresql] [--rate 20]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.bench.processes import (  # noqa: E402
    SimulatorProcess,
    cli_command,
    machine,
    run_process,
    worker_env,
)

REPORTS = ROOT / "benchmarks" / "reports" / "rate"
WORK = ROOT / "benchmarks" / "results" / "rate"
REDIS_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0")
PG_URL = os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def distinct_file(count: int, tag: str) -> Path:
    """``count`` changes to distinct IDs 1..count, one line each."""
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"distinct-{tag}-{count}.jsonl"
    if not path.exists():
        with path.open("w") as f:
            for i in range(1, count + 1):
                f.write(json.dumps({"ID": str(i), "lastname": f"n{i}"}) + "\n")
    return path


def sim_options(rate: float, window: str, known: int) -> list[str]:
    return [
        "--rate-limit",
        f"{rate:g}",
        "--rate-window",
        window,
        "--known-count",
        str(known),
        "--latency",
        "exp:20",
    ]


def worker_flags(rate: str, extra: list[str] | None = None) -> list[str]:
    return [
        "--rate",
        rate,
        "--batch-size",
        "1",
        "--linger-ms",
        "5",
        "--concurrency",
        "8",
        "--http-port",
        "0",
        "--log-format",
        "json",
        "--progress-interval",
        "5",
        *(extra or []),
    ]


def one_run(
    source: Path,
    rate: str,
    sim: list[str],
    label: str,
    timeout_s: float,
    extra: list[str] | None = None,
) -> dict[str, Any]:
    """A fresh simulator and one ``contact-worker run`` on ``source``; the figures."""
    events: list[dict[str, Any]] = []
    with SimulatorProcess(sim, WORK / f"{label}-sim.log") as simulator:
        command = [
            *cli_command(),
            "run",
            "--source",
            f"jsonl:{source}",
            "--dlq",
            f"jsonl:{WORK / (label + '-dead.jsonl')}",
            *worker_flags(rate, extra),
        ]
        process = run_process(
            command,
            log_path=WORK / f"{label}.log",
            timeout_s=timeout_s,
            env=worker_env(simulator.url),
            cwd=WORK,
            on_line=events.append,
        )
        stats = simulator.stats()
    logged = _json_lines(WORK / f"{label}.log") + events
    summary = next((e for e in logged if e.get("event") == "summary"), {})
    progress = [e for e in logged if e.get("event") == "progress"]
    return {
        "wall_s": process.wall_s,
        "returncode": process.returncode,
        "summary": summary,
        "last_progress_rate": progress[-1].get("rate") if progress else None,
        "sim": {k: stats[k] for k in ("by_status", "max_per_second", "rate_limited", "per_second")},
    }


def _json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def scenario_exact(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for rate in args.rates:
        requests = int(rate * args.seconds)
        source = distinct_file(requests, "exact")
        least = requests / rate
        for round_ in range(args.rounds_for(rate)):
            label = f"exact-r{rate:g}-{args.window}-{round_}"
            log(f"{label}: {requests} requests, least {least:.1f} s")
            run = one_run(
                source, f"{rate:g}", sim_options(rate, args.window, requests), label, 60 + 3 * least
            )
            s = run["summary"]
            rows.append(
                {
                    "R": rate,
                    "round": round_,
                    "requests": requests,
                    "least_s": least,
                    "wall_s": round(run["wall_s"], 3),
                    "engine_s": s.get("elapsed_s"),
                    "least_over_wall": round(least / run["wall_s"], 4),
                    "least_over_engine": round(least / s["elapsed_s"], 4)
                    if s.get("elapsed_s")
                    else None,
                    "answers_429": run["sim"]["rate_limited"],
                    "max_in_one_second": run["sim"]["max_per_second"],
                    "by_status": run["sim"]["by_status"],
                    "ending": s.get("ending"),
                }
            )
            log(f"  {rows[-1]}")
    return {"rows": rows, "medians": _medians(rows, ["least_over_wall", "least_over_engine"])}


def scenario_auto(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for rate in args.rates:
        requests = int(rate * args.seconds)
        source = distinct_file(requests, "auto")
        for round_ in range(args.rounds_for(rate)):
            label = f"auto-r{rate:g}-{args.window}-{round_}"
            log(f"{label}: {requests} requests, the API's limit {rate:g}/s hidden")
            run = one_run(
                source,
                "auto",
                sim_options(rate, args.window, requests),
                label,
                120 + 4 * args.seconds,
                ["--max-rate", "200"],
            )
            seconds = run["sim"]["per_second"][30:-1]  # from the 30th second, the last partial
            sent = sum(total for total, _ in seconds)
            refused = sum(r for _, r in seconds)
            rows.append(
                {
                    "R": rate,
                    "round": round_,
                    "requests": requests,
                    "seconds_after_30": len(seconds),
                    "used_after_30": round((sent - refused) / len(seconds) / rate, 4)
                    if seconds
                    else None,
                    "share_429_after_30": round(refused / sent, 4) if sent else None,
                    "answers_429_all": run["sim"]["rate_limited"],
                    "learned_rate": run["last_progress_rate"],
                    "wall_s": round(run["wall_s"], 3),
                    "ending": run["summary"].get("ending"),
                }
            )
            log(f"  {rows[-1]}")
    return {"rows": rows, "medians": _medians(rows, ["used_after_30", "share_429_after_30"])}


def _medians(rows: list[dict[str, Any]], keys: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for rate in sorted({row["R"] for row in rows}):
        mine = [row for row in rows if row["R"] == rate]
        out[f"{rate:g}"] = {
            key: statistics.median(row[key] for row in mine if row[key] is not None) for key in keys
        }
    return out


def _input_uri(kind: str, name: str, partitions: int) -> str:
    if kind == "redis":
        return f"{REDIS_URL}?stream={name}&partitions={partitions}"
    return f"{PG_URL}?schema={name}&partitions={partitions}"


def scenario_replicas(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    rate = args.rate
    for kind in args.inputs:
        for round_ in range(args.rounds):
            name = f"bench_rate_{uuid.uuid4().hex[:10]}"
            uri = _input_uri(kind, name, args.partitions)
            requests = int(rate * args.seconds)
            source = distinct_file(requests, "replicas")
            label = f"replicas-{kind}-r{rate:g}{'-auto' if args.auto else ''}-{round_}"
            env = os.environ | {"SMSGW_CLIENT_SECRET": "demo-secret"}
            subprocess.run([*cli_command(), "init", "--to", uri], check=True, env=env)
            with source.open("rb") as f:
                subprocess.run([*cli_command(), "enqueue", "--to", uri], stdin=f, check=True)
            log(f"{label}: {requests} requests over 3 replicas at --rate {rate:g}")
            with SimulatorProcess(
                sim_options(rate, args.window, requests), WORK / f"{label}-sim.log"
            ) as simulator:
                started = time.monotonic()
                procs = []
                for replica in range(3):
                    command = [
                        *cli_command(),
                        "run",
                        "--source",
                        uri,
                        *worker_flags(
                            "auto" if args.auto else f"{rate:g}",
                            ["--max-rate", "200"] if args.auto else None,
                        ),
                    ]
                    log_file = (WORK / f"{label}-{replica}.log").open("w")
                    procs.append(
                        (
                            subprocess.Popen(
                                command,
                                env=worker_env(simulator.url),
                                stdout=log_file,
                                stderr=log_file,
                                cwd=WORK,
                            ),
                            log_file,
                        )
                    )
                deadline = started + 120 + 3 * requests / rate
                while time.monotonic() < deadline:
                    time.sleep(1.0)
                    stats = simulator.stats()
                    if stats["contacts_applied"] >= requests:
                        break
                for proc, _ in procs:
                    proc.send_signal(signal.SIGTERM)
                for proc, log_file in procs:
                    proc.wait(timeout=60)
                    log_file.close()
                stats = simulator.stats()
            per_second = stats["per_second"]
            # All three have started (auto: learned); the last second is partial.
            busy = per_second[30 if args.auto else 5 : -1]
            sent = sum(total for total, _ in busy)
            refused = sum(r for _, r in busy)
            rows.append(
                {
                    "input": kind,
                    "rate_flag": "auto" if args.auto else f"{rate:g}",
                    "R": rate,
                    "round": round_,
                    "requests": requests,
                    "applied": stats["contacts_applied"],
                    "answers_429": stats["rate_limited"],
                    "share_429": round(stats["rate_limited"] / max(1, stats["requests"]), 4),
                    "used_together": round((sent - refused) / max(1, len(busy)) / rate, 4),
                    "share_429_counted": round(refused / max(1, sent), 4),
                    "counted_from_s": 30 if args.auto else 5,
                    "max_in_one_second": stats["max_per_second"],
                    "wall_s": round(time.monotonic() - started, 2),
                }
            )
            log(f"  {rows[-1]}")
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=["exact", "auto", "replicas"])
    parser.add_argument("--rates", default="5,20,100")
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--rounds-small",
        type=int,
        default=None,
        help="rounds for R below 100 (jobs are as long, fewer rounds fit; default --rounds)",
    )
    parser.add_argument("--window", choices=["bucket", "sliding"], default="bucket")
    parser.add_argument("--inputs", default="redis,postgresql")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument(
        "--auto", action="store_true", help="replicas: --rate auto (the limit hidden) instead of R"
    )
    args = parser.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    args.inputs = args.inputs.split(",")
    if args.seconds is None:
        args.seconds = {"exact": 40.0, "auto": 75.0, "replicas": 40.0}[args.scenario]
    small = args.rounds_small if args.rounds_small is not None else args.rounds
    args.rounds_for = lambda rate: args.rounds if rate >= 100 else small
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.UTC)
    result = {
        "scenario_rate": {"exact": scenario_exact, "auto": scenario_auto}.get(
            args.scenario, scenario_replicas
        )(args)
    }
    report = {
        "scenario": args.scenario,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "machine": machine(),
        "window": args.window,
        **result["scenario_rate"],
    }
    REPORTS.mkdir(parents=True, exist_ok=True)
    kind = args.scenario + ("-auto" if args.scenario == "replicas" and args.auto else "")
    path = REPORTS / f"{kind}-{args.window}-{started:%Y%m%dT%H%M}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in report if k != "rows"}, indent=1))
    print(f"report: {path}")


if __name__ == "__main__":
    main()
