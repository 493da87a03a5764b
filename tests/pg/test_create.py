"""Tables the worker creates at start, created by replicas starting together.

``CREATE TABLE IF NOT EXISTS`` alone races in PostgreSQL: two sessions that both find no table
both create it, and the second fails on the catalog's unique index. In the fault campaign
(2026-12-06) one of three replicas started together on a fresh schema exited 1 at start on the
shared rate's table (``type "contact_worker_rate" already exists``); the ID knowledge's table
failed so in most tries below. Every creation now takes one advisory lock.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import anyio
import asyncpg
import pytest

from tests.pg.conftest import BASE_DSN, Db
from worker.backends.postgres.pool import create_if_missing
from worker.backends.postgres.rate import PgRate
from worker.backends.postgres.uri import parse_uri
from worker.knowledge.postgres import PostgresKnowledge

REPLICAS = 6
TRIES = 5
"""Fresh tables per test: without the lock, each try failed 5 of 6 openings of the ID
knowledge's table here (the table and its index: two catalog entries to race on)."""

pytestmark = pytest.mark.anyio


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    """An empty schema, dropped afterwards."""
    admin = await asyncpg.connect(BASE_DSN, timeout=5)
    name = f"test_{uuid.uuid4().hex[:12]}"
    await admin.execute(f"CREATE SCHEMA {name}")
    try:
        yield name
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        await admin.close()


async def _at_once(*calls: Callable[[], Awaitable[object]]) -> list[BaseException]:
    """Run the coroutine functions ``calls`` together; the exceptions they raised."""
    failed: list[BaseException] = []

    async def one(call: Callable[[], Awaitable[object]]) -> None:
        try:
            await call()
        except Exception as exc:  # what a replica would die of
            failed.append(exc)

    async with anyio.create_task_group() as group:
        for call in calls:
            group.start_soon(one, call)
    return failed


async def test_sessions_creating_a_table_and_its_index_at_once_all_succeed(schema: str) -> None:
    conns = [await asyncpg.connect(BASE_DSN, timeout=5) for _ in range(REPLICAS)]
    try:
        for n in range(TRIES):
            ddl = (
                f"CREATE TABLE IF NOT EXISTS {schema}.t{n} (id text PRIMARY KEY, at float8);"
                f" CREATE INDEX IF NOT EXISTS t{n}_at ON {schema}.t{n} (at)"
            )
            calls = [partial(create_if_missing, conn, ddl) for conn in conns]
            assert await _at_once(*calls) == []
            assert all(not conn.is_in_transaction() for conn in conns)
    finally:
        for conn in conns:
            await conn.close()


async def test_replicas_opening_the_id_knowledge_at_once_all_start(schema: str) -> None:
    for n in range(TRIES):
        target = parse_uri(f"{BASE_DSN}?schema={schema}&table=box{n}")
        stores = [PostgresKnowledge(target) for _ in range(REPLICAS)]
        try:
            assert await _at_once(*(store.open for store in stores)) == []
        finally:
            for store in stores:
                await store.close()


async def test_replicas_booking_a_fresh_shared_rate_at_once_all_book(schema: str) -> None:
    pool = await asyncpg.create_pool(BASE_DSN, min_size=REPLICAS, max_size=REPLICAS)
    try:
        for n in range(TRIES):
            rates = [PgRate(lambda: pool, f"box{n}", f"{schema}.rate{n}") for _ in range(REPLICAS)]
            for rate in rates:
                rate.slots_us = []
            calls = [partial(rate.reserve, 100.0, 0.0, False) for rate in rates]
            assert await _at_once(*calls) == []
            slots = sorted(slot for rate in rates for slot in rate.slots_us or [])
            # One schedule: a slot each, none shared, spaced by the rate (10 ms, less the
            # allowance a shared rate keeps for the replicas' clocks).
            assert len(slots) == REPLICAS
            assert min(b - a for a, b in itertools.pairwise(slots)) >= 9_000
    finally:
        await pool.close()


async def test_init_beside_running_replicas_takes_turns(db: Db) -> None:
    """``init`` takes the same lock: an outbox re-created while replicas open their ID
    knowledge beside it (a deployment that runs ``init`` at each start) fails neither."""
    from worker.backends.postgres.producer import init

    target = parse_uri(db.uri())
    stores = [PostgresKnowledge(target) for _ in range(REPLICAS)]
    try:
        calls = [lambda: init(db.uri()), *(store.open for store in stores)]
        assert await _at_once(*calls) == []
    finally:
        for store in stores:
            await store.close()
