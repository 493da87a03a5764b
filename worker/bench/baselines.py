"""The two programs a user might write instead of contact-worker, run as their own process.

``per-change``
    One PATCH per change (a single object), under the same rate limit and concurrency.
``batch-fallback``
    Changes in arrival order, batched up to the batch size (or the linger time) without
    coalescing; a batch refused with 404 or 400 is resent one change at a time.

Both retry what is transient (429, 5xx, error 105, timeouts, dropped connections) with capped
exponential backoff and honour ``Retry-After``, as any careful script would; neither keeps
per-contact order under concurrency. ``python -m worker.bench.baselines KIND --source PATH``
prints JSON lines on stdout: ``ready``, ``progress`` and at the end ``summary`` (counters and
the change-to-ack latency histogram, measured from the moment a line was read).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiolimiter import AsyncLimiter

from worker.bench.histogram import Histogram

KINDS = ("per-change", "batch-fallback")
TRANSIENT_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)


class Refused(RuntimeError):
    """The API refused the credentials or the account: a baseline stops like the worker."""


@dataclass
class Item:
    """One input line and when it was read."""

    line: int
    raw: bytes
    read_at: float


@dataclass
class Counters:
    """What a baseline did; the summary's figures."""

    lines: int = 0
    invalid: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    isolation_requests: int = 0
    retries: int = 0
    changes_applied: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)
    done: int = 0
    latency: Histogram = field(default_factory=Histogram)


class Baseline:
    """Sends changes as one of the baselines does."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        *,
        rate: float,
        concurrency: int,
        batch_size: int,
        linger_s: float,
    ) -> None:
        self.session = session
        self.url = url
        self.limiter = AsyncLimiter(rate, 1.0) if rate > 0 else None
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.linger_s = linger_s
        self.counters = Counters()
        self.started = time.monotonic()

    async def request(self, body: bytes, *, isolating: bool = False) -> int:
        """PATCH ``body`` until the answer is not transient; the final status."""
        attempt = 0
        while True:
            if self.limiter is not None:
                await self.limiter.acquire()
            status: int | None = None
            data, retry_after = b"", None
            try:
                async with self.session.patch(self.url, data=body) as resp:
                    status = resp.status
                    data = b"" if status == 204 else await resp.read()
                    retry_after = resp.headers.get("Retry-After")
            except TRANSIENT_ERRORS:
                pass
            self.counters.requests[str(status) if status else "error"] += 1
            if isolating:
                self.counters.isolation_requests += 1
            if status in (401, 403) or (status and b'"104"' in data):
                raise Refused(f"HTTP {status}: {data[:200]!r}")
            transient = status is None or status >= 500 or status == 429 or b'"105"' in data
            if not transient:
                return status or 0
            attempt += 1
            self.counters.retries += 1
            delay = min(5.0, 0.1 * 2**attempt) * random.random()
            with contextlib.suppress(TypeError, ValueError):
                delay = max(delay, float(retry_after))  # type: ignore[arg-type]
            await asyncio.sleep(delay)

    def settle(self, item: Item, status: int) -> None:
        """Record how one change ended."""
        c = self.counters
        if 200 <= status < 300:
            c.changes_applied += 1
        else:
            c.dead_letters["not_found" if status == 404 else "rejected"] += 1
        c.done += 1
        c.latency.add(time.monotonic() - item.read_at)

    async def per_change(self, items: asyncio.Queue[Item | None]) -> None:
        """A consumer: one request per change."""
        while (item := await items.get()) is not None:
            self.settle(item, await self.request(item.raw))

    async def batches(self, items: asyncio.Queue[Item | None], out: asyncio.Queue[Any]) -> None:
        """The batcher: up to batch_size changes, or what came within linger of the first."""
        loop = asyncio.get_running_loop()
        ended = False
        while not ended:
            first = await items.get()
            if first is None:
                break
            batch = [first]
            deadline = loop.time() + self.linger_s
            while len(batch) < self.batch_size:
                try:
                    item = await asyncio.wait_for(items.get(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    break
                if item is None:
                    ended = True
                    break
                batch.append(item)
            await out.put(batch)
        for _ in range(self.concurrency):
            await out.put(None)

    async def batch_fallback(self, batches: asyncio.Queue[Any]) -> None:
        """A consumer: one request per batch; on 404/400 one request per change of it."""
        while (batch := await batches.get()) is not None:
            body = b"[" + b",".join(item.raw for item in batch) + b"]"
            status = await self.request(body)
            if status in (400, 404) and len(batch) > 1:
                for item in batch:
                    self.settle(item, await self.request(item.raw, isolating=True))
            else:
                for item in batch:
                    self.settle(item, status)

    async def feed(self, lines: AsyncIterator[bytes], items: asyncio.Queue[Item | None]) -> None:
        """Read lines; send on the valid JSON objects (a script checks no more than that)."""
        c = self.counters
        async for raw in lines:
            line = c.lines
            c.lines += 1
            raw = raw.strip()
            try:
                valid = isinstance(json.loads(raw), dict)
            except ValueError:
                valid = False
            if not valid:
                c.invalid += 1
                c.done += 1
                continue
            await items.put(Item(line, raw, time.monotonic()))


def read_lines(path: str, limit: int) -> list[bytes]:
    """The first ``limit`` lines of a file (0: all), read before the clock starts."""
    lines: list[bytes] = []
    with open(path, "rb") as f:
        for raw in f:
            if limit and len(lines) >= limit:
                break
            lines.append(raw)
    return lines


async def _listed_lines(lines: list[bytes]) -> AsyncIterator[bytes]:
    for count, raw in enumerate(lines):
        if raw.strip():
            yield raw
        if count % 512 == 0:
            await asyncio.sleep(0)


async def _stdin_lines(limit: int) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    count = 0
    while raw := await reader.readline():
        if limit and count >= limit:
            return
        count += 1
        if raw.strip():
            yield raw


def _say(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def summary(kind: str, baseline: Baseline, elapsed_s: float, error: str | None) -> dict[str, Any]:
    """The final JSON line."""
    c = baseline.counters
    return {
        "event": "summary",
        "kind": kind,
        "ending": "drained" if error is None else "refused",
        "error": error,
        "records_read": c.lines,
        "invalid": c.invalid,
        "requests": sum(c.requests.values()),
        "requests_by_status": dict(sorted(c.requests.items())),
        "isolation_requests": c.isolation_requests,
        "retries": c.retries,
        "contacts_applied": c.changes_applied,
        "changes_applied": c.changes_applied,
        "dead_letters": dict(c.dead_letters) | ({"invalid": c.invalid} if c.invalid else {}),
        "acked": c.done,
        "elapsed_s": round(elapsed_s, 3),
        "latency": c.latency.to_json(),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one baseline to the end of its input; its summary."""
    headers = {
        "X-Client-Id": os.environ.get("SMSGW_CLIENT_ID", "demo"),
        "X-Client-Secret": os.environ.get("SMSGW_CLIENT_SECRET", "demo-secret"),
        "Content-Type": "application/json",
    }
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=headers
    ) as session:
        baseline = Baseline(
            session,
            args.api_url.rstrip("/") + "/v1/contact",
            rate=args.rate,
            concurrency=args.concurrency,
            batch_size=args.batch_size,
            linger_s=args.linger_ms / 1000,
        )

        async def progress() -> None:
            while True:
                await asyncio.sleep(0.25)
                c = baseline.counters
                _say({"event": "progress", "read": c.lines, "acked": c.done})

        if args.source == "-":
            lines = _stdin_lines(args.max_lines)
        else:
            lines = _listed_lines(read_lines(args.source, args.max_lines))
        items: asyncio.Queue[Item | None] = asyncio.Queue(maxsize=max(1000, 4 * args.batch_size))
        started = time.monotonic()
        error = None
        reporter = asyncio.create_task(progress())
        try:
            async with asyncio.TaskGroup() as tg:
                if args.kind == "per-change":
                    for _ in range(args.concurrency):
                        tg.create_task(baseline.per_change(items))
                    ends = args.concurrency
                else:
                    batches: asyncio.Queue[Any] = asyncio.Queue(maxsize=2 * args.concurrency)
                    tg.create_task(baseline.batches(items, batches))
                    for _ in range(args.concurrency):
                        tg.create_task(baseline.batch_fallback(batches))
                    ends = 1
                await baseline.feed(lines, items)
                for _ in range(ends):
                    await items.put(None)
        except* Refused as group:
            error = str(group.exceptions[0])
        finally:
            reporter.cancel()
        return summary(args.kind, baseline, time.monotonic() - started, error)


def build_parser() -> argparse.ArgumentParser:
    """The baseline's command line (the API's URL and credentials from SMSGW_*, as the
    worker's)."""
    p = argparse.ArgumentParser(prog="python -m worker.bench.baselines", description=__doc__)
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--source", required=True, help="a JSONL file, or - for stdin")
    url = os.environ.get("SMSGW_API_URL")
    p.add_argument("--api-url", default=url, required=url is None, help="(SMSGW_API_URL)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--linger-ms", type=float, default=200.0)
    p.add_argument("--rate", type=float, default=10.0, help="requests/s (0 = no limit)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--request-timeout", type=float, default=30.0)
    p.add_argument("--max-lines", type=int, default=0, help="stop after N lines (0 = all)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run a baseline; 0 when drained, 3 when the API refused the credentials."""
    args = build_parser().parse_args(argv)
    _say({"event": "ready"})
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(args))
    else:
        result = uvloop.run(run(args))
    _say(result)
    return 0 if result["error"] is None else 3


if __name__ == "__main__":
    sys.exit(main())
