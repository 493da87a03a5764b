"""The feed between a knowledge store (the real SQLite) and the scheduler's memory."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from worker.core.knowledge import IdKnowledge, Known
from worker.knowledge.base import StoredFact
from worker.knowledge.feed import KnowledgeFeed
from worker.knowledge.sqlite import SqliteKnowledge

pytestmark = pytest.mark.anyio


class Clocks:
    """A monotonic clock and a wall clock 1,000,000 s apart, moved together."""

    def __init__(self) -> None:
        self.now = 10.0

    def mono(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + 1_000_000.0


async def test_prefetch_loads_what_memory_lacks(tmp_path: Path) -> None:
    """Facts in the store come into memory with their age kept; expired ones do not."""
    clocks = Clocks()
    async with SqliteKnowledge(str(tmp_path / "s.db")) as store:
        await store.save(
            [
                StoredFact("1", Known.EXISTS, clocks.wall() - 30.0),
                StoredFact("2", Known.MISSING, clocks.wall() - 60.0),
                StoredFact("3", Known.EXISTS, clocks.wall() - 2000.0),  # past the TTL
            ]
        )
        knowledge = IdKnowledge(ttl_s=900.0)
        feed = KnowledgeFeed(store, knowledge, clock=clocks.mono, wall_clock=clocks.wall)
        await feed.prefetch(["1", "2", "3", "4", "1"])
        one, two = knowledge.peek("1", clocks.now), knowledge.peek("2", clocks.now)
        assert one is not None and (Known.EXISTS, -20.0) == (one.known, one.learnt_at)
        assert two is not None and Known.MISSING == two.known
        assert None is knowledge.peek("3", clocks.now)
        assert (4, 2) == (feed.stats.looked_up, feed.stats.loaded)
        assert [] == knowledge.drain()  # loaded facts are not written back


async def test_flush_writes_what_the_api_taught(tmp_path: Path) -> None:
    """Facts learnt in memory reach the store with their wall-clock time, once."""
    clocks = Clocks()
    async with SqliteKnowledge(str(tmp_path / "s.db")) as store:
        knowledge = IdKnowledge()
        feed = KnowledgeFeed(store, knowledge, clock=clocks.mono, wall_clock=clocks.wall)
        knowledge.learn("7", Known.EXISTS, 5.0)
        clocks.now = 12.0
        await feed.flush()
        await feed.flush()
        assert [StoredFact("7", Known.EXISTS, 1_000_005.0)] == await store.load(["7"], 0.0)
        assert 1 == feed.stats.saved


async def test_a_failing_store_is_skipped_then_retried(tmp_path: Path) -> None:
    """A store that fails: one warning, memory goes on, the store is tried again later."""
    clocks = Clocks()
    store = SqliteKnowledge(str(tmp_path / "no" / "such" / "dir" / "s.db"))
    knowledge = IdKnowledge()
    feed = KnowledgeFeed(store, knowledge, clock=clocks.mono, wall_clock=clocks.wall, retry_s=30.0)
    with capture_logs() as logs:
        await feed.prefetch(["1"])
        await feed.prefetch(["2"])  # within retry_s: not even tried
        knowledge.learn("1", Known.EXISTS, clocks.now)
        await feed.flush()
    assert ["knowledge.unavailable"] == [e["event"] for e in logs]
    assert (1, False) == (feed.stats.failures, feed.available)
    clocks.now += 31.0
    assert feed.available
    await store.close()
