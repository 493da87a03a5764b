"""Partitioned PostgreSQL outbox (``partitions=P``): replicas share the partitions through
session-level advisory locks, and per-contact order holds while replicas die and come back."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from tests.cli.test_cli import BIN, Gateway, events, worker_env
from tests.engine.harness import expected_state, settings
from tests.engine.test_engine import applied_in_order, stream
from tests.pg.conftest import BASE_DSN, Db
from worker.backends.base import HeldRecords, running
from worker.backends.jsonl.sink import JsonlDeadLetters
from worker.backends.postgres.outbox import PgOutboxSource
from worker.backends.postgres.producer import enqueue, init
from worker.backends.postgres.uri import PARTITION_TAG, parse_uri
from worker.config import Secret
from worker.core.partition import partition_of
from worker.engine import Engine
from worker.sender import Sender
from worker.sim.gateway import SimConfig, Simulator, serve

FAST = {"partitions": 4, "rebalance_s": 0.2, "poll_s": 0.2}


async def until(predicate: Any, timeout_s: float = 15.0) -> None:
    with anyio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 - polling other tasks' state
            await anyio.sleep(0.02)


@asynccontextmanager
async def source(db: Db, **params: object) -> AsyncIterator[PgOutboxSource]:
    async with running(PgOutboxSource.from_uri(db.uri(**{**FAST, **params}))) as s:
        yield s


async def claim(s: PgOutboxSource) -> list[tuple[Any, bytes]]:
    """What one read returns now (nothing within a second: an empty list)."""
    with anyio.move_on_after(1):
        records = await s.read()
        assert isinstance(records, HeldRecords)
        return records.flat()
    return []


def line(i: int, seq: int) -> bytes:
    return orjson.dumps({"ID": str(i), "extra1": str(seq)})


pytestmark = pytest.mark.anyio


class TestInTheEnginesTaskGroup:
    async def test_keepers_run_in_the_engine_and_stop_with_it(
        self, db: Db, tmp_path: Path
    ) -> None:
        """The lease and partition keepers are started by the engine, in its task group: once
        the run is over (the source still open) nothing of the source is left running."""
        await enqueue(db.uri(partitions=2), [line(i, 1) for i in range(1, 21)])
        source = PgOutboxSource.from_uri(db.uri(**{**FAST, "partitions": 2}))
        sink = JsonlDeadLetters(str(tmp_path / "dead.jsonl"))
        sim = Simulator(SimConfig(known_count=200_000))
        await sink.open()
        async with serve(sim) as url, source:
            async with Sender(url, "demo", Secret("demo-secret"), timeout_s=5.0) as sender:
                engine = Engine(source, sink, sender, settings())

                async def stop_when_done() -> None:
                    await until(lambda: engine.stats.acked >= 20)
                    engine.shutdown()

                with anyio.fail_after(30):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(stop_when_done)
                        await engine.run()
            left_running = [
                name
                for task in asyncio.all_tasks()
                if not task.done()
                and "_keep" in (name := getattr(task.get_coro(), "__qualname__", ""))
            ]
        await sink.close()
        assert [] == left_running
        assert {str(i) for i in range(1, 21)} == set(sim.contacts)


class TestOwnership:
    async def test_two_sources_split_four_partitions_and_claim_only_their_own(self, db: Db) -> None:
        """The first source takes all 4; a second one joins: 2 each, disjoint; each claims
        rows of its own partitions only; closing one gives its partitions to the other."""
        await init(db.uri())
        await enqueue(db.uri(partitions=4), [line(i, 1) for i in range(1, 41)])
        rows = await db.admin.fetch(f"SELECT contact_id, partition FROM {db.outbox}")
        assert all(r["partition"] == partition_of(r["contact_id"], 4) for r in rows)
        async with source(db) as a:
            assert {0, 1, 2, 3} == a.held
            async with source(db) as b:
                await until(lambda: len(a.held) == 2 and len(b.held) == 2)
                assert not a.held & b.held
                got_a = await claim(a)
                got_b = await claim(b)
                assert 40 == len(got_a) + len(got_b)
                for s, got in ((a, got_a), (b, got_b)):
                    ids = [json.loads(text)["ID"] for _, text in got]
                    assert {partition_of(i, 4) for i in ids} <= s.held
                await a.ack([token for token, _ in got_a])
                await b.ack([token for token, _ in got_b])
            await until(lambda: {0, 1, 2, 3} == a.held)
            assert [] == await db.rows()

    async def test_given_back_partition_waits_for_rows_in_flight(self, db: Db) -> None:
        """A partition above the fair share stays locked while its rows are in flight (read,
        not forgotten, not acknowledged), and is unlocked once they are acknowledged."""
        await enqueue(db.uri(partitions=4), [line(i, 1) for i in range(1, 41)])
        async with source(db) as a:
            got = await claim(a)
            assert 40 == len(got)
            async with source(db) as b:
                await anyio.sleep(1.0)
                assert set() == b.held  # a keeps 2 over its share: their rows are in flight
                assert 4 == len(a.held) + len(a._draining)
                await a.ack([token for token, _ in got])
                await until(lambda: len(b.held) == 2)
                assert not a.held & b.held

    async def test_given_back_partition_stays_locked_however_long_its_rows_are_in_flight(
        self, db: Db
    ) -> None:
        """A partition given back is unlocked only once none of its rows is in a request, as
        long as that takes (the ownership policy's rule: the source used to unlock after 30 s
        anyway, and the next holder could overtake a request still on its way)."""
        await enqueue(db.uri(partitions=4), [line(i, 1) for i in range(1, 41)])
        now = [0.0]
        a = PgOutboxSource(parse_uri(db.uri(**FAST)), clock=lambda: now[0])
        async with running(a):
            got = await claim(a)
            assert 40 == len(got)
            async with source(db) as b:
                await until(lambda: 2 == len(a._draining))
                now[0] += 3600.0  # an hour on a's clock: its requests are still on their way
                await anyio.sleep(1.0)  # a few rebalance ticks
                assert set() == b.held
                assert 4 == len(a.held) + len(a._draining)

    async def test_lost_lock_connection_revokes_all_stops_claiming_and_recovers(
        self, db: Db
    ) -> None:
        """pg_terminate_backend on the lock connection: every partition is revoked at once
        (the engine forgets their waiting changes), nothing more is claimed until the locks
        are taken again on a new connection, and the rows forgotten come back."""
        await enqueue(db.uri(partitions=4), [line(i, 1) for i in range(1, 21)])
        revoked: list[list[str]] = []
        async with source(db, rebalance_s=1.0) as a:

            class Revocations:
                def assigned(self, partitions: Any) -> None:
                    pass

                def revoked(self, partitions: Any, covers: Any) -> int:
                    keys = [str(i) for i in range(1, 21)]
                    revoked.append([k for k in keys if covers(k)])
                    return 0

            a.assignments = Revocations()
            got = await claim(a)
            assert 20 == len(got)
            pid = a.lock_pid
            assert await db.admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            await until(lambda: 4 == a.stats.partitions_lost, 5)
            assert [sorted(str(i) for i in range(1, 21))] == [sorted(r) for r in revoked]
            assert 0 == a.in_flight
            await enqueue(db.uri(partitions=4), [line(i, 2) for i in range(1, 21)])
            # The next tick connects again and takes the partitions back.
            await until(lambda: len(a.held) == 4 and a.lock_pid not in (0, pid), 10)
            assert 2 == a.stats.lock_connections
            # A claim in the name of the dead lock session gets nothing, even before the
            # source noticed the loss: the claim checks pg_locks for the session's locks.
            a._lock_pid = pid
            assert [] == await a._claim_partitions(0)
            a._lock_pid = await a._locks.fetchval("SELECT pg_backend_pid()")
            again = await claim(a)
            # The 20 rows forgotten and the 20 new ones, in id order in each partition.
            assert 40 == len(again)
            for p in range(4):
                ids = [t for t, text in again if partition_of(json.loads(text)["ID"], 4) == p]
                assert ids == sorted(ids)
            await a.ack([t for t, _ in again])
        assert [] == await db.rows()

    async def test_partition_taken_later_is_claimed_from_its_oldest_row(self, db: Db) -> None:
        """A partition taken while the cursor is past its rows: its older rows are claimed
        (a fresh scan), first, in id order; a row of another partition is never claimed."""
        old = [f"k{i}" for i in range(200) if partition_of(f"k{i}", 2) == 1][:5]
        new = [f"k{i}" for i in range(200) if partition_of(f"k{i}", 2) == 0][:5]
        uri = db.uri(partitions=2)
        await enqueue(uri, [orjson.dumps({"ID": k, "extra1": "1"}) for k in old])
        await enqueue(uri, [orjson.dumps({"ID": k, "extra1": "1"}) for k in new])
        oid = await db.admin.fetchval("SELECT to_regclass($1)::oid::bigint", db.outbox)
        key1 = oid - (1 << 32) if oid >= 1 << 31 else oid
        # Someone else (the admin session) holds partition 1 for now.
        assert await db.admin.fetchval(
            "SELECT pg_try_advisory_lock($1::int, $2::int)", key1, PARTITION_TAG + 1
        )
        async with source(db, partitions=2) as a:
            assert {0} == a.held
            first = await claim(a)
            assert new == [json.loads(text)["ID"] for _, text in first]
            await db.admin.fetchval(
                "SELECT pg_advisory_unlock($1::int, $2::int)", key1, PARTITION_TAG + 1
            )
            await until(lambda: {0, 1} == a.held, 5)
            second = await claim(a)
            assert old == [json.loads(text)["ID"] for _, text in second]
            await a.ack([t for t, _ in first + second])
        assert [] == await db.rows()

    async def test_init_adds_the_partition_column_to_an_older_table(self, db: Db) -> None:
        """A table created before partitions: init adds the column and the index."""
        await db.admin.execute(f"DROP INDEX {db.schema}.contact_changes_part")
        await db.admin.execute(f"ALTER TABLE {db.outbox} DROP COLUMN partition")
        await init(db.uri())
        await init(db.uri())
        cols = await db.admin.fetchval(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass($1)"
            " AND attname = 'partition'",
            db.outbox,
        )
        assert 1 == cols
        assert await db.admin.fetchval(
            "SELECT to_regclass($1) IS NOT NULL", f"{db.schema}.contact_changes_part"
        )


# -- the user's level: three `contact-worker run` replicas, one killed and restarted -------------


def psql(sql: str) -> str:
    return subprocess.run(
        ["psql", BASE_DSN, "-tAc", sql], capture_output=True, text=True, timeout=30, check=True
    ).stdout.strip()


@pytest.fixture
def schema() -> Iterator[str]:
    name = f"cli_{uuid.uuid4().hex[:12]}"
    yield name
    psql(f"DROP SCHEMA IF EXISTS {name} CASCADE")


@pytest.mark.slow
def test_three_replicas_one_killed_and_restarted_keep_order(tmp_path: Path, schema: str) -> None:
    """3 `run` replicas on one outbox with 6 partitions; one is SIGKILLed mid-run and
    restarted, changes keep coming: every change is applied, per-ID sequence numbers never go
    backwards at the API, the outbox ends empty, and SIGTERM ends every replica with 0."""
    # lease_s=600: the victim's claimed rows can only come back in time if they are taken over
    # at once by the partition's next holder, as its lock proves the victim gone.
    query = urllib.parse.urlencode(
        {"schema": schema, "partitions": 6, "rebalance_s": 0.5, "lease_s": 600}
    )
    uri = f"{BASE_DSN}?{query}"
    changes = stream(4000, 300, seed=44)
    phases = [changes[:1500], changes[1500:3000], changes[3000:]]
    gw = Gateway("--known-count", "300", "--latency", "100", "--record-history")
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    env = worker_env(gw, tmp_path, WORKER_BATCH_SIZE="10", WORKER_CONCURRENCY="2")

    def start() -> subprocess.Popen[bytes]:
        logs.append(tmp_path / f"replica-{len(logs)}.log")
        with logs[-1].open("wb") as log:
            return subprocess.Popen(
                [BIN, "run", "--source", uri, "--http-port", "0"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def feed(part: list[Any]) -> None:
        data = b"".join(json.dumps(c).encode() + b"\n" for c in part)
        enq = subprocess.run(
            [BIN, "enqueue", "--to", uri], input=data, capture_output=True, timeout=60
        )
        assert 0 == enq.returncode, enq.stderr

    def applied() -> int:
        return sum(len(objs) for objs in gw.get("/_sim/history").values())

    try:
        init_run = subprocess.run(
            [BIN, "init", "--to", uri], capture_output=True, text=True, timeout=60
        )
        assert 0 == init_run.returncode, init_run.stderr
        procs = [start() for _ in range(3)]
        holders = (
            "SELECT count(DISTINCT pid) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            f" AND classid = to_regclass('{schema}.contact_changes')::oid AND objsubid = 2"
            f" AND objid::bigint BETWEEN {PARTITION_TAG} AND {PARTITION_TAG + 5}"
        )

        def shared_by_three() -> None:
            """Fair share: wait until each of the 3 replicas holds partitions (2 each)."""
            deadline = time.monotonic() + 20
            while psql(holders) != "3":
                assert time.monotonic() < deadline, "the partitions are not shared by 3"
                time.sleep(0.05)

        shared_by_three()
        # The API fails every request for now (transient errors: retried, nothing applied),
        # so no row is acknowledged: the rows the victim claims stay claimed, their count only
        # grows, and the victim is surely mid-run, holding rows, when it is killed.
        gw.configure(transient_error_rate=1.0)
        feed(phases[0])
        victim = f"/{procs[0].pid}/"
        deadline = time.monotonic() + 30
        while "0" == psql(
            f"SELECT count(*) FROM {schema}.contact_changes WHERE claimed_by LIKE '%{victim}%'"
        ):
            assert time.monotonic() < deadline, "the victim claimed nothing"
            time.sleep(0.05)
        procs[0].kill()  # SIGKILL mid-run: its session ends, its locks go
        procs[0].wait(10)
        gw.configure(transient_error_rate=0.0)
        feed(phases[1])
        time.sleep(1.5)  # the survivors take its partitions over
        procs[0] = start()
        logs[0] = logs.pop()
        shared_by_three()  # the survivors give partitions back to the restarted replica
        feed(phases[2])
        want = expected_state(changes)
        deadline = time.monotonic() + 60
        while gw.get("/_sim/contacts") != want:
            assert time.monotonic() < deadline, "not every change was applied"
            time.sleep(0.1)
        deadline = time.monotonic() + 20
        while psql(f"SELECT count(*) FROM {schema}.contact_changes") != "0":
            assert time.monotonic() < deadline, "rows left in the outbox"
            time.sleep(0.1)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        taken = []
        for proc, log in zip(procs, logs, strict=True):
            proc.wait(30)
            stderr = log.read_text()
            assert 0 == proc.returncode, stderr[-3000:]
            taken.append(sum(e["event"] == "partition taken" for e in events(stderr)))
        # The restarted replica got a share back; the survivors took the victim's over.
        assert taken[0] >= 1
        assert sum(taken[1:]) >= 6
        assert applied_in_order(gw.get("/_sim/history"))
        assert want == gw.get("/_sim/contacts")
        assert "0" == psql(f"SELECT count(*) FROM {schema}.contact_changes")
        assert "0" == psql(f"SELECT count(*) FROM {schema}.contact_changes_dead")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        gw.stop()
