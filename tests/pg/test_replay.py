"""Replay after a crash on a ``postgresql://`` outbox (DESIGN 9): the rows a dead worker left
claimed may have been sent; everything up to the last of them is claimed, and coalesced, before
any of it is sent; with partitions, per partition, also for one taken over mid-run."""

from __future__ import annotations

from pathlib import Path

import anyio
import asyncpg
import pytest

from tests.cli.replay_kill import changes as kill_changes
from tests.cli.replay_kill import feed, gateway, kill_twice_then_finish
from tests.engine.replay import backlog, expected, lines, regressions, run_replay
from tests.pg.conftest import BASE_DSN, Db
from worker.backends.postgres.outbox import PgOutboxSource
from worker.backends.postgres.producer import enqueue
from worker.backends.postgres.uri import MEMBER_KEY, PARTITION_TAG
from worker.engine import Ending, Engine

pytestmark = pytest.mark.anyio


async def claim_all_as_dead(db: Db, lease_s: float) -> None:
    """A worker claimed every row (its lease running ``lease_s`` more) and died."""
    await db.admin.execute(
        f"UPDATE {db.outbox} SET claimed_by = 'deadhost/1/0123456789ab:1',"
        " claimed_until = now() + make_interval(secs => $1)",
        lease_s,
    )


class TestOutboxReplay:
    async def test_rows_claimed_by_a_dead_worker_are_coalesced_before_any_is_sent(
        self, db: Db, tmp_path: Path
    ) -> None:
        """Every row is claimed by a dead worker whose lease runs a little longer: the restart
        waits for it, then claims 100 rows at a time, holding all until the last row the dead
        one had claimed: no contact goes back."""
        changes = backlog(1500)
        await enqueue(db.uri(), lines(changes))
        await claim_all_as_dead(db, lease_s=0.5)
        source = PgOutboxSource.from_uri(db.uri(batch=100, poll_s=0.2))
        run = await run_replay(tmp_path, source, len(changes))
        assert Ending.SHUTDOWN == run.result.ending
        assert [] == regressions(run.sim.history)
        assert expected(changes) == run.sim.contacts
        [done] = run.events("source.replay_done")
        assert (True, len(changes)) == (done["complete"], done["changes"])
        assert [] == await db.rows()

    async def test_a_stop_during_the_replay_sends_none_of_it(self, db: Db, tmp_path: Path) -> None:
        """The dead worker's newer rows are still leased (another worker may yet send them):
        the older rows claimed meanwhile stay held, and a stop then sends none of them; they
        stay in the outbox, released, for the next start."""
        changes = backlog(100)
        await enqueue(db.uri(), lines(changes))
        half = len(changes) // 2
        await claim_all_as_dead(db, lease_s=600)
        await db.admin.execute(
            f"UPDATE {db.outbox} SET claimed_until = now() - interval '1 second'"
            f" WHERE id <= (SELECT min(id) FROM {db.outbox}) + $1",
            half - 1,
        )
        source = PgOutboxSource.from_uri(db.uri(batch=1000, poll_s=0.2))

        async def stop_once_held(engine: Engine) -> None:
            with anyio.fail_after(20):
                while engine.stats.records < half:  # noqa: ASYNC110 - counters
                    await anyio.sleep(0.005)
            await anyio.sleep(0.5)  # long enough for a request, had one been allowed
            engine.shutdown()

        run = await run_replay(tmp_path, source, len(changes), during=stop_once_held)
        assert Ending.SHUTDOWN == run.result.ending
        assert 1 == run.sim.stats.requests  # the seeding one only
        assert 0 == run.engine.stats.acked
        [dropped] = run.events("source.replay_dropped")
        assert half == dropped["changes"]
        rows = await db.rows()
        assert len(changes) == len(rows)
        assert half == sum(row["claimed_by"] is None for row in rows)


class TestPartitionedOutboxReplay:
    async def test_partitions_taken_at_the_start_and_mid_run_are_replayed_whole(
        self, db: Db, tmp_path: Path
    ) -> None:
        """Two partitions, every row claimed by a dead replica; another replica still holds
        partition 1 and stops mid-run: partition 0 is taken at the start, partition 1 later,
        each held (its IDs only) until its rows up to the last claimed one were claimed."""
        changes = backlog(1500)
        uri = db.uri(partitions=2, rebalance_s=0.1, poll_s=0.2, batch=100)
        await enqueue(uri, lines(changes))
        await claim_all_as_dead(db, lease_s=600)
        oid = int(await db.admin.fetchval("SELECT to_regclass($1)::oid::bigint", db.outbox))
        key = oid - (1 << 32) if oid >= 1 << 31 else oid
        other = await asyncpg.connect(BASE_DSN)
        await other.execute(f"SELECT pg_advisory_lock_shared({key}, {MEMBER_KEY})")
        await other.execute(f"SELECT pg_advisory_lock({key}, {PARTITION_TAG + 1})")
        taken_mid_run: list[bool] = []
        source = PgOutboxSource.from_uri(uri)

        async def stop_the_other(engine: Engine) -> None:
            with anyio.fail_after(20):
                while engine.stats.acked == 0:  # noqa: ASYNC110 - counters
                    await anyio.sleep(0.005)
            taken_mid_run.append(source.held == frozenset({0}))
            await other.close()

        try:
            run = await run_replay(tmp_path, source, len(changes), during=stop_the_other)
        finally:
            if not other.is_closed():
                await other.close()
        assert [True] == taken_mid_run
        assert [] == regressions(run.sim.history)
        assert expected(changes) == run.sim.contacts
        done = {e["range"]: e for e in run.events("source.replay_done")}
        assert {f"{source.name}:0", f"{source.name}:1"} == set(done)
        assert all(e["complete"] for e in done.values())
        assert len(changes) == sum(e["changes"] for e in done.values())


@pytest.mark.slow
async def test_kill_9_twice_mid_run(db: Db, tmp_path: Path) -> None:
    """A real `run` on the outbox, killed twice mid-run and restarted (the killed one's
    leases run 2 s): no contact ever went back."""
    items = kill_changes()
    uri = db.uri(lease_s=2, poll_s=0.2)
    feed(uri, items)
    gw = gateway()
    try:
        events = await anyio.to_thread.run_sync(
            lambda: kill_twice_then_finish(gw, tmp_path, ["--source", uri], items, finite=False)
        )
    finally:
        gw.stop()
    assert [True] == [e["complete"] for e in events if e["event"] == "source.replay_done"]
