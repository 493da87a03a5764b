"""Replay after a crash on a ``redis://`` stream (DESIGN 9): the entries a dead consumer left
pending may have been sent; they are claimed, read in full, and coalesced, before any of them
is sent; in a partitioned stream, per partition, also for one taken over mid-run."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from redis.asyncio import Redis

from tests.cli.replay_kill import changes as kill_changes
from tests.cli.replay_kill import feed, gateway, kill_twice_then_finish
from tests.engine.replay import backlog, expected, lines, regressions, run_replay
from worker.backends.redis.producer import enqueue, init
from worker.backends.redis.stream import from_uri
from worker.engine import Ending, Engine

pytestmark = pytest.mark.anyio

GROUP = "contact-worker"


async def read_by_dead_consumer(redis_url: str, streams: list[str]) -> int:
    """A consumer reads every entry and dies: they stay pending at it."""
    client = Redis.from_url(redis_url)
    try:
        reply = await client.xreadgroup(GROUP, "dead", dict.fromkeys(streams, ">"), count=1_000_000)
        return sum(len(entries) for _, entries in reply)
    finally:
        await client.aclose()


class TestStreamReplay:
    async def test_pending_entries_of_a_dead_consumer_are_coalesced_before_any_is_sent(
        self, redis_url: str, prefix: str, tmp_path: Path
    ) -> None:
        """Every entry is pending at a dead consumer; the restart claims them and re-reads
        them 100 at a time, holding all until the last: no contact goes back."""
        changes = backlog(1500)
        uri = f"{redis_url}?stream={prefix}:c&batch=100&claim_idle_s=0&poll_s=0.2"
        await init(uri)
        await enqueue(uri, lines(changes))
        assert len(changes) == await read_by_dead_consumer(redis_url, [f"{prefix}:c"])
        run = await run_replay(tmp_path, from_uri(uri, consumer="new"), len(changes))
        assert Ending.SHUTDOWN == run.result.ending
        assert [] == regressions(run.sim.history)
        assert expected(changes) == run.sim.contacts
        [done] = run.events("source.replay_done")
        assert (True, len(changes)) == (done["complete"], done["changes"])


class TestPartitionedReplay:
    async def test_partitions_taken_at_the_start_and_mid_run_are_replayed_whole(
        self, redis_url: str, prefix: str, tmp_path: Path
    ) -> None:
        """Two partitions, every entry pending at a dead consumer whose lease on partition 1
        still runs for a while: partition 0 is taken at the start, partition 1 mid-run, and
        each is held (its IDs only) until its pending entries were re-read: no contact goes
        back, in either."""
        changes = backlog(1500)
        uri = f"{redis_url}?stream={prefix}:c&partitions=2&lease_s=0.3&batch=100&poll_s=0.1"
        await init(uri)
        await enqueue(uri, lines(changes))
        streams = [f"{prefix}:c:0", f"{prefix}:c:1"]
        assert len(changes) == await read_by_dead_consumer(redis_url, streams)
        client = Redis.from_url(redis_url)
        try:
            await client.set(f"{prefix}:c:1:lease", "dead", px=1500)
        finally:
            await client.aclose()
        taken_mid_run: list[bool] = []

        async def watch(engine: Engine) -> None:
            # Partition 0's changes go while partition 1 is still leased by the dead one.
            with anyio.fail_after(20):
                while engine.stats.acked == 0:  # noqa: ASYNC110 - counters
                    await anyio.sleep(0.005)
            taken_mid_run.append(source.held == [0])

        source = from_uri(uri, consumer="new")
        run = await run_replay(tmp_path, source, len(changes), during=watch)
        assert [True] == taken_mid_run
        assert [] == regressions(run.sim.history)
        assert expected(changes) == run.sim.contacts
        done = {e["range"]: e for e in run.events("source.replay_done")}
        assert set(streams) == set(done)
        assert all(e["complete"] for e in done.values())
        assert len(changes) == sum(e["changes"] for e in done.values())


@pytest.mark.slow
async def test_kill_9_twice_mid_run(redis_url: str, prefix: str, tmp_path: Path) -> None:
    """A real `run` on a stream, killed twice mid-run and restarted (a stable consumer name,
    so it re-reads its own pending entries at once): no contact ever went back."""
    items = kill_changes()
    uri = f"{redis_url}?stream={prefix}:c&consumer=w1&poll_s=0.2"
    feed(uri, items)
    gw = gateway()
    try:
        events = await anyio.to_thread.run_sync(
            lambda: kill_twice_then_finish(gw, tmp_path, ["--source", uri], items, finite=False)
        )
    finally:
        gw.stop()
    assert [True] == [e["complete"] for e in events if e["event"] == "source.replay_done"]
