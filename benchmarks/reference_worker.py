"""A careful single-file worker: the yardstick of the hot path (issue 15).

The program a competent engineer would write for the same job in an afternoon: it reads a JSONL
file in large chunks, checks each change (an object, a usable ``ID``, known fields), coalesces
per ID, keeps at most one request in flight per ID, sends batches of ``--batch-size`` over one
aiohttp session with ``--concurrency`` senders, and on a 404 halves the batch until the unknown
IDs stand alone. No metrics, no checkpoint, no dead-letter file (it counts them), no retries
beyond what this benchmark's simulator needs (it answers every request).

    python benchmarks/reference_worker.py PATH --batch-size 100 --concurrency 8

Reads ``SMSGW_API_URL``, ``SMSGW_CLIENT_ID``, ``SMSGW_CLIENT_SECRET``; prints one JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
from collections import deque

import aiohttp
import orjson

FIELDS = frozenset(
    {"ID", "phone", "groupid", "firstname", "lastname", "birthday", "unsubscribed"}
    | {f"extra{i}" for i in range(1, 9)}
)
CHUNK = 1 << 18


class Job:
    def __init__(self, batch: int, max_waiting: int, bound_changes: bool = False) -> None:
        self.batch = batch
        self.max_waiting = max_waiting
        self.bound_changes = bound_changes
        """Count the changes held against ``max_waiting``, as contact-worker does, rather
        than the IDs (``--bound changes``)."""
        self.held = 0
        """Changes read and not yet taken into a request."""
        self.counts: dict[str, int] = {}
        """Per waiting ID, how many changes merged into it (``--bound changes`` only)."""
        self.waiting: dict[str, dict[str, object]] = {}
        self.ready: deque[str] = deque()
        self.in_flight: set[str] = set()
        self.changes = self.invalid = self.applied = self.missing = self.requests = 0
        self.done_reading = False
        self.wake = asyncio.Event()
        self.room = asyncio.Event()

    def add(self, line: bytes) -> None:
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            self.invalid += 1
            return
        if type(obj) is not dict or not FIELDS.issuperset(obj) or len(obj) < 2:
            self.invalid += 1
            return
        ident = obj.get("ID")
        if type(ident) is int:
            key = str(ident)
        elif type(ident) is str and ident:
            key = ident
        else:
            self.invalid += 1
            return
        self.changes += 1
        if self.bound_changes:
            self.held += 1
            self.counts[key] = self.counts.get(key, 0) + 1
        merged = self.waiting.get(key)
        if merged is None:
            self.waiting[key] = obj
            if key not in self.in_flight:
                self.ready.append(key)
        else:
            merged.update(obj)

    def full(self) -> bool:
        """Whether reading must pause: ``max_waiting`` IDs waiting (or changes held)."""
        held = self.held if self.bound_changes else len(self.waiting)
        return held >= self.max_waiting

    def take(self) -> list[tuple[str, dict[str, object]]]:
        out = []
        while self.ready and len(out) < self.batch:
            key = self.ready.popleft()
            out.append((key, self.waiting.pop(key)))
            self.in_flight.add(key)
            if self.bound_changes:
                self.held -= self.counts.pop(key)
        return out

    def release(self, keys: list[str]) -> None:
        for key in keys:
            self.in_flight.discard(key)
            if key in self.waiting:
                self.ready.append(key)


async def read(job: Job, path: str) -> None:
    with open(path, "rb") as f:  # noqa: ASYNC230 - the reads go through to_thread
        rest = b""
        while True:
            chunk = await asyncio.to_thread(f.read, CHUNK)
            if not chunk:
                break
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                if line:
                    job.add(line)
            job.wake.set()
            while job.full():
                job.room.clear()
                await job.room.wait()
        if rest.strip():
            job.add(rest)
    job.done_reading = True
    job.wake.set()


async def send(job: Job, session: aiohttp.ClientSession, url: str) -> None:
    while True:
        items = job.take()
        if not items:
            if job.done_reading and not job.in_flight and not job.waiting:
                job.wake.set()
                return
            job.wake.clear()
            await job.wake.wait()
            continue
        await patch(job, session, url, items)
        job.release([key for key, _ in items])
        job.room.set()
        job.wake.set()


async def patch(
    job: Job, session: aiohttp.ClientSession, url: str, items: list[tuple[str, dict[str, object]]]
) -> None:
    job.requests += 1
    body = orjson.dumps([obj for _, obj in items])
    async with session.patch(url, data=body) as resp:
        status = resp.status
        await resp.read()
    if status < 300:
        job.applied += len(items)
    elif status == 404 and len(items) > 1:
        half = len(items) // 2
        await patch(job, session, url, items[:half])
        await patch(job, session, url, items[half:])
    elif status == 404:
        job.missing += 1
    else:
        raise RuntimeError(f"answer {status}")


async def main(args: argparse.Namespace) -> dict[str, object]:
    job = Job(args.batch_size, args.max_waiting, args.bound == "changes")
    url = os.environ["SMSGW_API_URL"].rstrip("/") + "/v1/contact"
    headers = {
        "X-Client-Id": os.environ["SMSGW_CLIENT_ID"],
        "X-Client-Secret": os.environ["SMSGW_CLIENT_SECRET"],
        "Content-Type": "application/json",
    }
    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        await asyncio.gather(
            read(job, args.path), *(send(job, session, url) for _ in range(args.concurrency))
        )
    return {
        "event": "summary",
        "elapsed_s": round(time.perf_counter() - started, 3),
        "records_read": job.changes + job.invalid,
        "changes_applied": job.applied,
        "missing": job.missing,
        "invalid": job.invalid,
        "requests": job.requests,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-waiting", type=int, default=200_000)
    parser.add_argument(
        "--bound",
        choices=("ids", "changes"),
        default="ids",
        help="what --max-waiting counts: waiting IDs (this worker's own way: it keeps nothing"
        " per change) or changes held (contact-worker's: the same window of merging)",
    )
    args = parser.parse_args()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)  # as the worker tunes its own: compare code, not settings
    print(orjson.dumps(asyncio.run(main(args))).decode(), file=sys.stderr, flush=True)
