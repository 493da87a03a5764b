"""Replicas share the account's rate through their input's store (issue 12 part 5): three
processes booking from one schedule in the real Redis and the real PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.pg.conftest import BASE_DSN
from tests.redis.conftest import SHARED, _reachable
from worker.core.rate import NS_PER_S, most_in_window

ROOT = Path(__file__).parents[2]
RATE = 20.0
SECONDS = 4.0


def _replicas(kind: str, url: str, name: str, delays: list[float]) -> list[dict[str, list[int]]]:
    """Start one process per delay (each books for SECONDS after its delay); their times."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.rate.replica",
                kind,
                url,
                name,
                str(RATE),
                str(SECONDS),
                str(delay),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        for delay in delays
    ]
    out = []
    try:
        for proc in procs:
            stdout, _ = proc.communicate(timeout=60)
            assert 0 == proc.returncode
            out.append(orjson.loads(stdout))
    finally:
        for proc in procs:  # none left running when one failed
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
    return out


def _check(replicas: list[dict[str, list[int]]]) -> None:
    """Together: the slots booked (the store's clock) never put more than R in any second;
    the requests as the processes woke up for them neither (a sender later than 20 ms after
    its slot, reckoned from when it asked for it, books another; the shared schedule keeps R
    per 1.025 s); and the rate is used to at least 0.9 while any replica had work, from the
    first second on."""
    slots = sorted(us * 1000 for one in replicas for us in one["slots_us"])
    assert most_in_window(slots, NS_PER_S) <= RATE
    sent = sorted(t for one in replicas for t in one["sent_ns"])
    assert most_in_window(sent, NS_PER_S) <= RATE
    span_s = (slots[-1] - slots[0]) / NS_PER_S
    assert len(slots) >= 0.9 * RATE * span_s
    assert all(one["slots_us"] for one in replicas)  # each replica got slots


@pytest.fixture
def redis_url() -> str:
    if not _reachable(*SHARED):
        pytest.skip("no Redis on 127.0.0.1:6379")
    return f"redis://{SHARED[0]}:{SHARED[1]}/0"


@pytest.fixture
def pg_schema() -> Iterator[str]:
    import asyncio

    import asyncpg

    schema = f"rate_{uuid.uuid4().hex[:12]}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(BASE_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f"CREATE SCHEMA {schema}"))
    yield schema
    asyncio.run(run(f"DROP SCHEMA {schema} CASCADE"))


class TestPublishedRate:
    """The account's rate lives with its schedule: what one replica publishes, all keep."""

    @pytest.mark.anyio
    async def test_redis(self, redis_url: str) -> None:
        """A replica publishing 10/s sets the spacing another (at 50/s, not publishing)
        books with; the account's rate comes back with each booking."""
        from redis.asyncio import Redis

        from worker.backends.redis.rate import RedisRate

        client = Redis.from_url(redis_url)
        key = f"test:{uuid.uuid4().hex}:rate"
        try:
            a, b = RedisRate(lambda: client, key), RedisRate(lambda: client, key)
            _, account = await a.reserve(10.0, 0.0, True)
            assert account == pytest.approx(10.0, rel=1e-4)
            wait, account = await b.reserve(50.0, 0.0, False)
            assert account == pytest.approx(10.0, rel=1e-4)
            assert wait == pytest.approx(0.101, abs=0.01)  # a's spacing, not b's 20 ms
        finally:
            await client.delete(key)
            await client.aclose()

    @pytest.mark.anyio
    async def test_postgresql(self, pg_schema: str) -> None:
        """The same in one PostgreSQL row."""
        import asyncpg

        from worker.backends.postgres.rate import PgRate

        pool = await asyncpg.create_pool(BASE_DSN, min_size=1, max_size=2)
        try:
            table = f"{pg_schema}.contact_worker_rate"
            a, b = PgRate(lambda: pool, "outbox", table), PgRate(lambda: pool, "outbox", table)
            _, account = await a.reserve(10.0, 0.0, True)
            assert account == pytest.approx(10.0, rel=1e-4)
            wait, account = await b.reserve(50.0, 0.0, False)
            assert account == pytest.approx(10.0, rel=1e-4)
            assert wait == pytest.approx(0.101, abs=0.01)
        finally:
            await pool.close()


@pytest.mark.slow
class TestSharedRate:
    def test_three_replicas_on_redis_keep_one_rate(self, redis_url: str) -> None:
        """Three processes, one starting 2 s late: together never above R in a second, and
        the rate is used in full from the start (the late one's share is not lost)."""
        key = f"test:{uuid.uuid4().hex}:rate"
        _check(_replicas("redis", redis_url, key, [0.0, 0.0, 2.0]))

    def test_three_replicas_on_postgresql_keep_one_rate(self, pg_schema: str) -> None:
        """The same with the schedule in one PostgreSQL row."""
        _check(_replicas("pg", BASE_DSN, f"{pg_schema}.outbox", [0.0, 0.0, 2.0]))


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["redis", "postgresql"])
async def test_an_unreachable_store_leaves_a_schedule_of_its_own(kind: str) -> None:
    """While the store cannot be reached (no connection yet, or lost), a replica books from a
    schedule of its own at the full rate, pauses included, and says so once."""
    from structlog.testing import capture_logs

    from worker.backends.postgres.rate import PgRate
    from worker.backends.redis.rate import RedisRate

    store = RedisRate(lambda: None, "x:rate") if kind == "redis" else PgRate(lambda: None, "x")
    with capture_logs() as logs:
        waits = [(await store.reserve(10.0, 0.0, False))[0] for _ in range(3)]
        paused, _ = await store.reserve(10.0, 2.0, False)
    assert waits[0] == pytest.approx(0.0, abs=0.01)
    assert waits[1] - waits[0] == pytest.approx(0.101, abs=0.01)
    assert waits[2] - waits[1] == pytest.approx(0.101, abs=0.01)
    assert paused >= 2.0
    assert 1 == sum(1 for e in logs if e["event"] == "rate.shared_unavailable")
