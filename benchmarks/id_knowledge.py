"""ID knowledge and isolation near the information bound (issue 13), end to end.

The real ``contact-worker run`` against ``contact-worker simulate`` over real sockets; the
requests counted by the simulator (the worker's start-up check left out, reported apart).

fresh
    ``--contacts`` fresh IDs, each changed once, a share ``p`` unknown to the API (0.1 %, 1 %,
    5 %; the simulator decides by a hash of the ID, so the share of a sample varies a little);
    batch 100, ``--state memory``. Requests per contact over the information bound
    ``max(1/B, H(p))`` with ``p`` the sample's own share. ``--rounds`` rounds, other IDs each;
    the median is reported, and the same figure from the pure core (``worker.bench.replay``)
    on 200,000 IDs.
recurring
    1 % unknown; a first run learns, the worker is restarted, and a second run changes the same
    contacts (the unknown ones included): its requests over ``ceil(contacts / B)``, and its
    isolation requests (none may go to an ID known missing). For a ``jsonl:`` input with
    ``--state sqlite:PATH``, and for a Redis stream of 6 partitions read by three replicas
    (both runs by three fresh processes, the knowledge shared in Redis).

    .venv/bin/python benchmarks/id_knowledge.py [--contacts 20000] [--rounds 3] [--only fresh]

Prints Markdown tables on stdout (with the date and the load average); writes
benchmarks/results/id_knowledge.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.bench.bounds import binary_entropy  # noqa: E402
from worker.bench.replay import replay  # noqa: E402

BIN = str(Path(sys.executable).with_name("contact-worker"))
SECRET = "bench-secret"
B = 100
SHARES = (0.001, 0.01, 0.05)
GOALS = {0.001: 1.5, 0.01: 1.15, 0.05: 1.15}
REDIS = "redis://127.0.0.1:6379/0"


class Sim:
    """A ``contact-worker simulate`` process."""

    def __init__(self, unknown_share: float) -> None:
        self.proc = subprocess.Popen(
            [
                BIN,
                "simulate",
                "--port",
                "0",
                "--client-secret",
                SECRET,
                "--latency",
                "1",
                "--unknown-share",
                str(unknown_share),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().split()[-1]

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/_sim/stats", timeout=10) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]

    def requests(self) -> int:
        return int(self.stats()["requests"])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def env(sim: Sim, tmp: Path, **extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "SMSGW_"))}
    out.update(
        SMSGW_API_URL=sim.url,
        SMSGW_CLIENT_ID="demo",
        SMSGW_CLIENT_SECRET=SECRET,
        WORKER_DLQ=f"jsonl:{tmp / 'dead.jsonl'}",
        WORKER_HTTP_PORT="0",
        WORKER_LINGER_MS="50",
        WORKER_RATE="0",
        WORKER_BATCH_SIZE=str(B),
        WORKER_LOG_FORMAT="json",
        WORKER_PROGRESS_INTERVAL="0",
    )
    out.update(extra)
    return out


def write_changes(path: Path, ids: list[str], value: str) -> None:
    path.write_text("".join(json.dumps({"ID": i, "lastname": value}) + "\n" for i in ids))


def summary(stderr: str) -> dict[str, Any]:
    for line in stderr.splitlines():
        if line.startswith("{") and '"summary"' in line:
            event = json.loads(line)
            if event.get("event") == "summary":
                return event  # type: ignore[no-any-return]
    raise RuntimeError(f"no summary in the log:\n{stderr[-2000:]}")


def run_file(sim: Sim, tmp: Path, source: Path, *args: str) -> tuple[int, dict[str, Any]]:
    """One ``run`` to the end of the file: requests past its start-up check, its summary."""
    before = sim.requests()
    done = subprocess.run(
        [BIN, "run", "--source", f"jsonl:{source}", *args],
        env=env(sim, tmp),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"run exited {done.returncode}:\n{done.stderr[-3000:]}")
    return sim.requests() - before - 1, summary(done.stderr)


def missing_ids(ids: list[str], share: float) -> set[str]:
    import zlib

    return {i for i in ids if zlib.crc32(i.encode()) / 2**32 < share}


def fresh(contacts: int, rounds: int) -> list[dict[str, Any]]:
    rows = []
    for p in SHARES:
        ratios, measured = [], []
        for r in range(rounds):
            ids = [str(1_000_000 * (r + 1) + n) for n in range(contacts)]
            random.Random(r).shuffle(ids)
            d = len(missing_ids(ids, p))
            bound = max(1 / B, binary_entropy(d / contacts))
            sim = Sim(p)
            try:
                with tempfile.TemporaryDirectory() as name:
                    tmp = Path(name)
                    write_changes(tmp / "in.jsonl", ids, "x")
                    requests, done = run_file(sim, tmp, tmp / "in.jsonl", "--state", "memory")
            finally:
                sim.stop()
            ratio = requests / contacts / bound
            ratios.append(ratio)
            measured.append(
                {
                    "round": r,
                    "unknown": d,
                    "requests": requests,
                    "ratio": ratio,
                    "isolation_requests": done["isolation_requests"],
                }
            )
            print(
                f"fresh p={p}: round {r}: {d} unknown, {requests} requests, {ratio:.3f} x bound",
                file=sys.stderr,
            )
        core = core_ratio(p)
        rows.append(
            {
                "p": p,
                "contacts": contacts,
                "rounds": measured,
                "median_ratio": statistics.median(ratios),
                "core_ratio_200k": core,
                "goal": GOALS[p],
            }
        )
    return rows


def core_ratio(p: float, n: int = 200_000) -> float:
    ids = [str(50_000_000 + k) for k in range(n)]
    missing = missing_ids(ids, p)
    lines = [b'{"ID": "%s", "lastname": "x"}' % i.encode() for i in ids]
    result = replay(lines, lambda key: key not in missing, batch_size=B)
    return result.requests / n / max(1 / B, binary_entropy(len(missing) / n))


def recurring_file(contacts: int) -> dict[str, Any]:
    p = 0.01
    ids = [str(7_000_000 + n) for n in range(contacts)]
    random.Random(7).shuffle(ids)
    d = len(missing_ids(ids, p))
    sim = Sim(p)
    try:
        with tempfile.TemporaryDirectory() as name:
            tmp = Path(name)
            state = ["--state", f"sqlite:{tmp / 'state.db'}"]
            write_changes(tmp / "in.jsonl", ids, "first")
            first, _ = run_file(sim, tmp, tmp / "in.jsonl", *state)
            write_changes(tmp / "in.jsonl", ids, "second")
            second, done = run_file(sim, tmp, tmp / "in.jsonl", *state)
    finally:
        sim.stop()
    floor = math.ceil(contacts / B)
    return {
        "input": "jsonl: + --state sqlite:",
        "contacts": contacts,
        "unknown": d,
        "first_run_requests": first,
        "second_run_requests": second,
        "ratio": second / floor,
        "isolation_requests": done["isolation_requests"],
        "goal": 1.1,
    }


def redis_cli(*args: str) -> str:
    return subprocess.run(
        ["redis-cli", "-u", REDIS, *args], capture_output=True, text=True, check=True
    ).stdout


def recurring_replicas(contacts: int, replicas: int = 3) -> dict[str, Any]:
    p = 0.01
    ids = [str(8_000_000 + n) for n in range(contacts)]
    random.Random(8).shuffle(ids)
    d = len(missing_ids(ids, p))
    stream = f"bench-ids-{uuid.uuid4().hex[:8]}"
    uri = f"{REDIS}?stream={stream}&partitions=6&lease_s=2"
    sim = Sim(p)
    runs = []
    try:
        with tempfile.TemporaryDirectory() as name:
            tmp = Path(name)
            subprocess.run([BIN, "init", "--to", uri], check=True, capture_output=True)
            for value in ("first", "second"):
                write_changes(tmp / "in.jsonl", ids, value)
                with open(tmp / "in.jsonl", "rb") as f:
                    subprocess.run(
                        [BIN, "enqueue", "--to", uri], stdin=f, check=True, capture_output=True
                    )
                before = sim.requests()
                procs = [
                    subprocess.Popen(
                        [BIN, "run", "--source", f"{uri}&consumer=r{k}"],
                        env=env(sim, tmp, WORKER_DLQ=uri),
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                    for k in range(replicas)
                ]
                target = (contacts - d) * (1 if value == "first" else 2)
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline:
                    applied = sim.stats()["contacts_applied"]
                    dead = int(redis_cli("XLEN", f"{stream}:dead").strip() or 0)
                    if applied >= target and dead >= d * (1 if value == "first" else 2):
                        break
                    time.sleep(0.2)
                else:
                    raise RuntimeError("replicas did not drain the stream")
                time.sleep(1.0)  # let in-flight acknowledgements finish
                for proc in procs:
                    proc.send_signal(signal.SIGTERM)
                logs = [proc.communicate(timeout=60)[1] for proc in procs]
                isolation = sum(summary(log)["isolation_requests"] for log in logs)
                runs.append(
                    {
                        "requests": sim.requests() - before - replicas,
                        "isolation_requests": isolation,
                    }
                )
    finally:
        sim.stop()
        keys = redis_cli("--scan", "--pattern", f"{stream}*").split()
        if keys:
            redis_cli("DEL", *keys)
    floor = math.ceil(contacts / B)
    return {
        "input": f"redis:// 6 partitions, {replicas} replicas",
        "contacts": contacts,
        "unknown": d,
        "first_run_requests": runs[0]["requests"],
        "second_run_requests": runs[1]["requests"],
        "ratio": runs[1]["requests"] / floor,
        "isolation_requests": runs[1]["isolation_requests"],
        "goal": 1.1,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contacts", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=("fresh", "recurring"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_before": load_before,
    }
    if args.only in (None, "fresh"):
        report["fresh"] = fresh(args.contacts, args.rounds)
    if args.only in (None, "recurring"):
        report["recurring"] = [recurring_file(args.contacts), recurring_replicas(args.contacts)]
    report["load_after"] = os.getloadavg()
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "id_knowledge.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"Measured {report['date']}, load average {load_before[0]:.2f} before,"
        f" {report['load_after'][0]:.2f} after.\n"
    )
    if "fresh" in report:
        print(
            "| p | contacts | rounds | requests/contact / bound (median) | per round |"
            " pure core, 200,000 IDs | goal |"
        )
        print("|---|---|---|---|---|---|---|")
        for row in report["fresh"]:
            per = ", ".join(f"{r['ratio']:.3f}" for r in row["rounds"])
            print(
                f"| {row['p']:.1%} | {row['contacts']:,} | {len(row['rounds'])} |"
                f" {row['median_ratio']:.3f} | {per} | {row['core_ratio_200k']:.3f} |"
                f" <= {row['goal']} |"
            )
        print()
    if "recurring" in report:
        print(
            "| input | contacts | unknown | first run requests | second run requests |"
            " / ceil(contacts/B) | isolation requests (2nd) | goal |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for row in report["recurring"]:
            print(
                f"| {row['input']} | {row['contacts']:,} | {row['unknown']} |"
                f" {row['first_run_requests']} | {row['second_run_requests']} |"
                f" {row['ratio']:.3f} | {row['isolation_requests']} | <= {row['goal']} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
