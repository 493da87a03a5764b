"""One replica booking request slots from a shared rate (run as a process by the tests).

``python -m tests.rate.replica redis|pg URL NAME RATE SECONDS DELAY`` waits DELAY seconds,
then books and waits out slots for SECONDS with four senders, as the engine's senders do,
and prints, as JSON, the slots it booked (the store's clock, microseconds) and the wall-clock
times (ns) at which its requests would have gone.
"""

from __future__ import annotations

import sys
import time

import anyio
import orjson

from worker.backends.postgres.rate import PgRate
from worker.backends.redis.rate import RedisRate
from worker.limiter import RateLimiter


async def _shared(kind: str, url: str, name: str) -> tuple[RedisRate | PgRate, object]:
    if kind == "redis":
        from redis.asyncio import Redis

        client = Redis.from_url(url)
        return RedisRate(lambda: client, name), client
    import asyncpg

    pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    schema, row = name.split(".", 1)
    return PgRate(lambda: pool, row, f"{schema}.contact_worker_rate"), pool


async def main(kind: str, url: str, name: str, rate: float, seconds: float, delay: float) -> None:
    shared, handle = await _shared(kind, url, name)
    shared.slots_us = []
    limiter = RateLimiter(rate, shared=shared)
    sent: list[int] = []
    await anyio.sleep(delay)
    end = time.monotonic() + seconds

    async def sender() -> None:
        while time.monotonic() < end:
            await limiter.acquire()
            sent.append(time.time_ns())

    async with anyio.create_task_group() as group:
        for _ in range(4):
            group.start_soon(sender)
    await (handle.aclose() if kind == "redis" else handle.close())  # type: ignore[attr-defined]
    out = {"slots_us": shared.slots_us, "sent_ns": sorted(sent)}
    sys.stdout.write(orjson.dumps(out).decode() + "\n")


if __name__ == "__main__":
    kind, url, name, rate, seconds, delay = sys.argv[1:7]
    anyio.run(main, kind, url, name, float(rate), float(seconds), float(delay))
