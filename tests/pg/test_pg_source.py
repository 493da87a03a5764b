"""The PostgreSQL outbox source and dead-letter table, against the real PostgreSQL and the
engine running against the simulated gateway over real sockets."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from tests.engine.harness import expected_state, settings
from tests.engine.test_engine import applied_in_order, stream
from tests.pg.conftest import Db
from worker.backends.base import SourceError, running
from worker.backends.postgres.outbox import PgOutboxSource
from worker.backends.postgres.producer import enqueue, init, outbox_row
from worker.backends.postgres.sink import PgDeadLetters
from worker.backends.postgres.uri import DDL, parse_uri
from worker.config import Secret
from worker.core.partition import partition_of
from worker.deadletters.base import DeadLetterError
from worker.engine import Ending, Engine, EngineSettings, Result
from worker.errors import ConfigError
from worker.sender import Sender
from worker.sim.gateway import SimConfig, Simulator, serve

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


async def until(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Wait until the predicate over other tasks' counters holds."""
    with anyio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 - polling counters of other tasks
            await anyio.sleep(0.005)


async def until_async(predicate: Callable[[], Awaitable[int]], timeout_s: float = 30.0) -> None:
    """Wait until the predicate (a query, say) returns something true."""
    with anyio.fail_after(timeout_s):
        while not await predicate():  # noqa: ASYNC110 - polling the database
            await anyio.sleep(0.005)


async def read(source: PgOutboxSource) -> list[tuple[Any, bytes]]:
    """The next records (the source is infinite: never None)."""
    records = await source.read()
    assert records is not None
    return list(records)


def lines(changes: list[Any]) -> list[bytes]:
    """JSONL lines for these changes (bytes are taken as they are)."""
    return [c if isinstance(c, bytes) else orjson.dumps(c) for c in changes]


@asynccontextmanager
async def opened(db: Db, **params: object) -> AsyncIterator[tuple[PgOutboxSource, PgDeadLetters]]:
    """The source and the dead-letter sink for the test's outbox, opened."""
    source = PgOutboxSource.from_uri(db.uri(**params))
    sink = PgDeadLetters.from_uri(db.uri())
    await source.open()
    try:
        await sink.open()
        try:
            yield source, sink
        finally:
            await sink.close()
    finally:
        await source.close()


@dataclass
class Run:
    result: Result
    engine: Engine
    sim: Simulator
    source: PgOutboxSource


async def run_until_acked(
    db: Db,
    records: int,
    config: SimConfig,
    engine_settings: EngineSettings | None = None,
    *,
    during: Callable[[Simulator], Coroutine[Any, Any, None]] | None = None,
    **params: object,
) -> Run:
    """Run the engine on the outbox until ``records`` rows are acknowledged, then shut it down
    (the source never ends by itself); ``during`` runs beside it."""
    sim = Simulator(config)
    es = engine_settings or settings(batch=20, concurrency=4)
    async with serve(sim) as url, opened(db, **params) as (source, sink):
        async with Sender(url, config.client_id, Secret(config.client_secret)) as sender:
            engine = Engine(source, sink, sender, es)

            async def stop_when_done() -> None:
                await until(lambda: engine.stats.acked >= records)
                engine.shutdown()

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(stop_when_done)
                    if during is not None:
                        tg.start_soon(during, sim)
                    result = await engine.run()
    return Run(result, engine, sim, source)


class TestRoundTrip:
    async def test_applied_in_order_invalid_and_unknown_dead_lettered_table_emptied(
        self, db: Db
    ) -> None:
        """Every row goes through the real engine: valid changes applied in per-ID order,
        invalid rows and unknown IDs in the dead-letter table, the outbox empty afterwards."""
        changes: list[Any] = stream(600, 40, unknown=frozenset({900, 901}))
        bad = [
            b'{"ID": 7, "lastname": ',
            b'{"ID": 8, "nickname": "x"}',
            b'{"lastname": "no id"}',
            b"[1, 2]",
        ]
        for at, line in zip((5, 100, 300, 599), bad, strict=True):
            changes.insert(at, line)
        assert len(changes) == await enqueue(db.uri(), lines(changes))

        run = await run_until_acked(
            db, len(changes), SimConfig(known_count=40, record_history=True)
        )

        assert Ending.SHUTDOWN == run.result.ending
        known = [c for c in changes if isinstance(c, dict) and int(c["ID"]) <= 40]
        assert expected_state(known) == run.sim.contacts
        assert applied_in_order(run.sim.history)
        assert [] == await db.rows()
        letters = [orjson.loads(text) for text in await db.dead()]
        invalid = [d for d in letters if d["reason"] == "invalid"]
        assert 4 == len(invalid)
        by_raw = {d["raw"]: d for d in invalid}
        assert "not valid JSON" in by_raw['{"ID": 7, "lastname": ']["detail"]
        assert by_raw['{"ID": 7, "lastname": ']["source"].startswith(f"postgresql:{db.outbox}/")
        assert {"900", "901"} == {
            str(d["change"]["ID"]) for d in letters if d["reason"] == "not_found"
        }
        assert run.source.stats.rows_acked == len(changes)

    async def test_shutdown_leaves_unsent_rows_released(self, db: Db) -> None:
        """Stopped mid-run, the worker acknowledges only what was applied; the rest stays in
        the table, none of it left claimed (the next worker need not wait for a lease)."""
        await enqueue(db.uri(), lines([{"ID": i, "lastname": "x"} for i in range(1, 201)]))
        sim = Simulator(SimConfig(known_count=200, latency="50"))
        es = settings(batch=10, concurrency=1, max_waiting=20)
        async with serve(sim) as url, opened(db, batch=20) as (source, sink):
            async with Sender(url, "demo", Secret("demo-secret")) as sender:
                engine = Engine(source, sink, sender, es)
                async with anyio.create_task_group() as tg:

                    async def stop_soon() -> None:
                        await until(lambda: sim.stats.contacts_applied >= 20)
                        engine.shutdown()

                    tg.start_soon(stop_soon)
                    result = await engine.run()
        assert Ending.SHUTDOWN == result.ending
        assert sim.stats.contacts_applied == source.stats.rows_acked
        rows = await db.rows()
        assert 200 - sim.stats.contacts_applied == len(rows)
        assert {None} == {row["claimed_by"] for row in rows}
        assert list(range(201 - len(rows), 201)) == [row["id"] for row in rows]


class TestMisfiledRows:
    async def test_row_whose_contact_id_is_not_its_id_is_dead_lettered_and_acked(
        self, db: Db
    ) -> None:
        """A row filed under one contact_id whose change names another ID (string or integer)
        is dead-lettered ``invalid`` naming both, never sent, and deleted; the rest applied
        (a line holding a NUL travels as text: decoded, and not misfiled)."""
        rows = [
            ("1", {"ID": "1", "lastname": "one"}),
            ("100012", {"ID": "100013", "lastname": "wrong"}),
            ("2", {"ID": 3, "lastname": "wrong too"}),
            ("3", {"ID": 3, "lastname": "three"}),
            ("100013", {"ID": "100013", "firstname": "right"}),
        ]
        await db.admin.executemany(
            f"INSERT INTO {db.outbox} (contact_id, change) VALUES ($1, $2::jsonb)",
            [(key, orjson.dumps(change).decode()) for key, change in rows],
        )
        nul = {"ID": 4, "lastname": "a\u0000b"}  # jsonb refuses NUL: the row holds the text
        await enqueue(db.uri(), [orjson.dumps(nul)])

        run = await run_until_acked(
            db, 6, SimConfig(known_ids=frozenset({"1", "3", "4", "100013"}))
        )

        assert {
            "1": {"lastname": "one"},
            "3": {"lastname": "three"},
            "4": {"lastname": "a\u0000b"},
            "100013": {"firstname": "right"},
        } == run.sim.contacts
        assert [] == await db.rows()
        letters = [orjson.loads(text) for text in await db.dead()]
        assert [("invalid", "100013"), ("invalid", 3)] == [
            (d["reason"], d["change"]["ID"]) for d in letters
        ]
        assert "'100013'" in letters[0]["detail"]
        assert "contact_id '100012'" in letters[0]["detail"]
        assert "ID '3'" in letters[1]["detail"]
        assert "contact_id '2'" in letters[1]["detail"]
        assert letters[0]["source"].startswith(f"postgresql:{db.outbox}/")

    async def test_row_in_another_partition_than_its_contact_id_is_dead_lettered(
        self, db: Db
    ) -> None:
        """Partitioned, a row whose ``partition`` is not the one of its ID is dead-lettered
        ``invalid`` naming both partitions, never sent, and deleted; so is a row whose
        contact_id (from which its partition came) is not its ID."""
        p5 = partition_of("5", 4)
        rows = [
            ("5", {"ID": "5", "lastname": "five"}, p5),
            ("6", {"ID": "6", "lastname": "wrong"}, (partition_of("6", 4) + 1) % 4),
            ("7", {"ID": "8", "lastname": "wrong too"}, partition_of("7", 4)),
            ("8", {"ID": 8, "lastname": "eight"}, partition_of("8", 4)),
        ]
        await db.admin.executemany(
            f"INSERT INTO {db.outbox} (contact_id, change, partition) VALUES ($1, $2::jsonb, $3)",
            [(key, orjson.dumps(change).decode(), p) for key, change, p in rows],
        )
        nul = {"ID": 9, "lastname": "a\u0000b"}  # the row holds the text; 9 keeps its partition
        await enqueue(db.uri(partitions=4), [orjson.dumps(nul)])

        run = await run_until_acked(
            db,
            5,
            SimConfig(known_ids=frozenset({"5", "6", "8", "9"})),
            partitions=4,
            rebalance_s=0.2,
            poll_s=0.2,
        )

        assert {
            "5": {"lastname": "five"},
            "8": {"lastname": "eight"},
            "9": {"lastname": "a\u0000b"},
        } == run.sim.contacts
        assert [] == await db.rows()
        letters = {str(d["change"]["ID"]): d for d in map(orjson.loads, await db.dead())}
        assert {"invalid"} == {d["reason"] for d in letters.values()}
        assert ["6", "8"] == sorted(letters)
        right = partition_of("6", 4)
        assert f"partition {right} of 4" in letters["6"]["detail"]
        assert f"(partition {(right + 1) % 4})" in letters["6"]["detail"]
        assert "contact_id '7'" in letters["8"]["detail"]


class TestAcknowledgement:
    async def test_rows_deleted_only_after_apply_no_transaction_held(self, db: Db) -> None:
        """While requests are in flight their rows are claimed and still there, and none of
        the worker's connections sits idle in a transaction."""
        await enqueue(db.uri(), lines([{"ID": i, "lastname": "x"} for i in range(1, 51)]))
        seen: dict[str, Any] = {}

        async def look(sim: Simulator) -> None:
            await until(lambda: sim.stats.in_flight > 0)
            seen["rows"] = await db.rows()
            seen["idle_in_tx"] = await db.admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = $1 AND state LIKE 'idle in transaction%'",
                db.app,
            )
            seen["connections"] = await db.admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", db.app
            )

        run = await run_until_acked(
            db, 50, SimConfig(known_count=50, latency="300"), settings(batch=50), during=look
        )
        assert 50 == len(seen["rows"])
        assert all(row["claimed_by"] is not None for row in seen["rows"])
        assert 0 == seen["idle_in_tx"]
        assert seen["connections"] >= 2  # the pool and the listener
        assert [] == await db.rows()
        assert 50 == run.sim.stats.contacts_applied


class TestCrashedWorker:
    @pytest.mark.slow
    async def test_rows_of_a_killed_worker_come_back_before_newer_ones(self, db: Db) -> None:
        """A worker killed (-9) holding claimed rows: a second worker waits for the lease to
        run out, then sends those rows before any newer row (per-ID order at the API)."""
        changes = stream(300, 15, seed=11)
        await enqueue(db.uri(), lines(changes))
        code = (
            "import asyncio, sys\n"
            "from worker.backends.postgres.outbox import PgOutboxSource\n"
            "async def main():\n"
            "    source = PgOutboxSource.from_uri(sys.argv[1])\n"
            "    await source.open()\n"
            "    print(len(await source.read()), flush=True)\n"
            "    await asyncio.sleep(60)\n"
            "asyncio.run(main())\n"
        )
        uri = db.uri(batch=100, lease_s=2)
        async with await anyio.open_process([sys.executable, "-c", code, uri], cwd=ROOT) as proc:
            assert proc.stdout is not None
            with anyio.fail_after(20):
                out = b""
                while not out.endswith(b"\n"):
                    out += await proc.stdout.receive()
            proc.kill()
            await proc.wait()
        assert b"100\n" == out
        claimed = [row for row in await db.rows() if row["claimed_by"] is not None]
        assert list(range(1, 101)) == [row["id"] for row in claimed]

        run = await run_until_acked(
            db, 300, SimConfig(known_count=15, record_history=True), lease_s=2, poll_s=0.2
        )
        assert applied_in_order(run.sim.history)
        assert expected_state(changes) == run.sim.contacts
        assert [] == await db.rows()


class TestLeases:
    @pytest.mark.slow
    async def test_lease_renewed_while_in_flight_released_on_close(self, db: Db) -> None:
        """Rows handed out stay claimed past their first lease (renewed), so another worker
        gets nothing, not even newer rows; once the first closes they are the other's."""
        await enqueue(db.uri(), lines([{"ID": i, "lastname": "x"} for i in range(1, 11)]))
        first = PgOutboxSource.from_uri(db.uri(batch=5, lease_s=0.6, poll_s=0.1))
        second = PgOutboxSource.from_uri(db.uri(lease_s=0.6, poll_s=0.1))
        async with running(second):
            async with running(first):  # its leases kept in a task group, as in a run
                assert [1, 2, 3, 4, 5] == [token for token, _ in await read(first)]
                await anyio.sleep(1.5)  # two and a half leases
                assert first.stats.rows_renewed >= 5
                with anyio.move_on_after(0.5):
                    await second.read()
                    pytest.fail("the second worker overtook rows the first still holds")
            with anyio.fail_after(5):
                records = await read(second)
            assert list(range(1, 11)) == [token for token, _ in records]


class LoseFirstCommitAnswer:
    """Wraps a pool: the first COMMIT takes effect, then its connection dies before the
    answer arrives (the window a database restart can hit)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.armed = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        async with self.pool.acquire() as conn:
            yield _Connection(conn, self)


class _Connection:
    def __init__(self, conn: Any, owner: LoseFirstCommitAnswer) -> None:
        self.conn, self.owner = conn, owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)

    async def execute(self, query: str, *args: Any) -> Any:
        result = await self.conn.execute(query, *args)
        if query == "COMMIT" and self.owner.armed:
            self.owner.armed = False
            self.conn.terminate()
            raise ConnectionResetError("connection lost after COMMIT")
        return result


class TestLostAnswer:
    async def test_claim_committed_but_answer_lost_is_taken_first(self, db: Db) -> None:
        """A claim whose COMMIT went through but whose answer was lost: the retry takes
        those rows (they are ours now) instead of skipping to newer ones."""
        await enqueue(db.uri(), lines([{"ID": i, "lastname": "x"} for i in range(1, 11)]))
        async with opened(db, batch=4) as (source, _):
            source._pool = LoseFirstCommitAnswer(source._pool)  # the network, misbehaving
            assert [1, 2, 3, 4] == [token for token, _ in await read(source)]
            assert [5, 6, 7, 8] == [token for token, _ in await read(source)]
            assert 1 == source.stats.retries
            source._pool = source._pool.pool


class TestWakeUp:
    async def test_insert_wakes_an_idle_source_before_the_fallback_poll(self, db: Db) -> None:
        """An idle reader is woken by the trigger's notification, not by its 60 s poll."""
        async with opened(db, poll_s=60) as (source, _):
            got: list[Any] = []

            async def reader() -> None:
                got.extend(await read(source))

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(reader)
                    await anyio.sleep(0.3)
                    assert [] == got
                    await enqueue(db.uri(), [b'{"ID": 1, "lastname": "Lee"}'])
            assert [b'{"ID": 1, "lastname": "Lee"}'] == [data for _, data in got]
            assert source.stats.wakeups >= 1


class TestOutage:
    async def test_connections_killed_mid_run_lose_nothing(self, db: Db) -> None:
        """The worker's connections are terminated (as a database restart does) while its
        statements wait on a table lock, again and again: it reconnects, retries, loses
        nothing and keeps per-ID order."""
        changes = stream(800, 300, seed=5)
        await enqueue(db.uri(), lines(changes))
        killed: list[int] = []

        async def chaos(sim: Simulator) -> None:
            for _ in range(3):
                await until(lambda: sim.stats.requests > 5 * (len(killed) + 1))
                async with db.admin.transaction():
                    await db.admin.execute(f"LOCK TABLE {db.outbox} IN ACCESS EXCLUSIVE MODE")
                    await until_async(lambda: db.activity("wait_event_type = 'Lock'"))
                    killed.append(
                        await db.admin.fetchval(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                            " WHERE application_name = $1",
                            db.app,
                        )
                    )

        run = await run_until_acked(
            db,
            800,
            SimConfig(known_count=300, latency="5", record_history=True),
            settings(batch=10, concurrency=2),
            during=chaos,
            batch=50,
        )
        assert 3 == len(killed)
        assert run.source.stats.retries >= 3
        assert run.source.stats.listens > 1
        assert applied_in_order(run.sim.history)
        assert expected_state(changes) == run.sim.contacts
        assert [] == await db.rows()


class TestOpening:
    async def test_unreachable_database_is_a_clear_error(self) -> None:
        """A refused connection fails open() with the address, never the password."""
        source = PgOutboxSource.from_uri("postgresql://u:hunter2@127.0.0.1:1/test")
        with pytest.raises(SourceError) as info:
            await source.open()
        assert "postgresql://u@127.0.0.1:1/test" in str(info.value)
        assert "hunter2" not in str(info.value)

    async def test_missing_tables_name_the_fix(self, db: Db) -> None:
        """A table that is not there: the message says how to create it."""
        with pytest.raises(SourceError, match="contact-worker init --to"):
            await PgOutboxSource.from_uri(db.uri(table="nope")).open()
        with pytest.raises(DeadLetterError, match="nope_dead does not exist"):
            await PgDeadLetters.from_uri(db.uri(table="nope")).open()

    def test_uri_parameters(self) -> None:
        """The worker's parameters are parsed and stripped; the rest goes to asyncpg."""
        target = parse_uri(
            "postgresql://me:pw@db:5433/shop?table=outbox&schema=crm&batch=50&lease_s=30"
            "&poll_s=2&sslmode=disable"
        )
        assert ("outbox", "crm", 50, 30.0, 2.0) == (
            target.table,
            target.schema,
            target.batch,
            target.lease_s,
            target.poll_s,
        )
        assert "postgresql://me:pw@db:5433/shop?sslmode=disable" == target.dsn
        assert "postgresql://me@db:5433/shop" == target.display
        assert "crm.outbox_dead" == target.dead
        for bad in (
            "table=Robert');DROP",
            "batch=0",
            "lease_s=soon",
            "partitions=0",
            "partitions=9999",
            "leas_s=5",  # a misspelt worker parameter, not a server setting for asyncpg
            "search_path=crm",  # a server setting goes in options=-c ...
        ):
            with pytest.raises(ConfigError):
                parse_uri(f"postgresql://db/shop?{bad}")


class TestProducer:
    async def test_init_is_idempotent_and_ids_follow_line_order(self, db: Db) -> None:
        """init twice changes nothing; enqueue keeps line order in ids; blank lines skipped."""
        await init(db.uri())
        triggers = await db.admin.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass($1)", db.outbox
        )
        assert 1 == triggers
        n = await enqueue(db.uri(), [b'{"ID": 2, "lastname": "a"}', b"  ", "not json"] * 3)
        assert 6 == n
        rows = await db.rows()
        assert ["2", "", "2", "", "2", ""] == [row["contact_id"] for row in rows]
        assert rows[0]["id"] < rows[1]["id"] < rows[2]["id"]

    def test_rows_for_lines(self) -> None:
        """contact_id is the ID's string form; undecodable lines travel as JSON strings."""
        assert ("123", '{"ID": 123, "x": 1}') == outbox_row(b'{"ID": 123, "x": 1}\n')
        assert ("", '{"lastname": "x"}') == outbox_row(b'{"lastname": "x"}')
        assert ("", '"{\\"ID\\": 1, "') == outbox_row(b'{"ID": 1, \r\n')
        assert ("", '"{\\"ID\\": true}"') != outbox_row(b'{"ID": true}')
        assert ("", '{"ID": true}') == outbox_row(b'{"ID": true}')
        assert None is outbox_row(b" \r\n")
        nul = b'{"ID": 5, "lastname": "a\\u0000b"}'  # jsonb refuses NUL: the text, keyed
        assert ("5", orjson.dumps(nul.decode()).decode()) == outbox_row(nul)

    def test_readme_ddl_names_the_default_table(self) -> None:
        """The DDL constant is docs/inputs/postgresql.md's: the default table, no schema."""
        assert "CREATE TABLE IF NOT EXISTS contact_changes (" in DDL
        assert "CREATE TABLE IF NOT EXISTS contact_changes_dead (" in DDL
        assert "CREATE OR REPLACE TRIGGER contact_changes_notify" in DDL
