"""The feed between a knowledge store and the scheduler's in-memory knowledge.

Before the engine takes a slice of changes in, :meth:`KnowledgeFeed.prefetch` loads what the
store knows of their IDs (those memory does not know already), in one round trip; every
``flush_interval_s`` :meth:`KnowledgeFeed.flush` writes what the API taught since, and now and
then prunes the store to its TTL and size bound. Times cross over here: the core counts in the
monotonic clock, stores in wall-clock seconds (shared by replicas and restarts).

A store that fails costs requests, not changes: the feed logs ``knowledge.unavailable`` once,
goes on from memory, and tries the store again after ``retry_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import anyio
import structlog

from worker.core.knowledge import IdKnowledge
from worker.knowledge.base import KnowledgeError, KnowledgeStore, StoredFact

log = structlog.get_logger("worker.knowledge")


@dataclass(slots=True)
class FeedStats:
    """What went between the store and memory."""

    looked_up: int = 0
    """IDs asked of the store."""
    loaded: int = 0
    """Facts the store knew of them."""
    saved: int = 0
    pruned: int = 0
    failures: int = 0


class KnowledgeFeed:
    """Carries facts between ``store`` and ``knowledge``."""

    def __init__(
        self,
        store: KnowledgeStore,
        knowledge: IdKnowledge,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        flush_interval_s: float = 1.0,
        prune_interval_s: float = 60.0,
        retry_s: float = 30.0,
    ) -> None:
        self.store = store
        self.knowledge = knowledge
        self._clock = clock
        self._wall = wall_clock
        self.flush_interval_s = flush_interval_s
        self.prune_interval_s = prune_interval_s
        self.retry_s = retry_s
        self.stats = FeedStats()
        self._down_until: float | None = None
        self._next_prune = 0.0
        knowledge.keep_journal()

    @property
    def available(self) -> bool:
        """False while the store is taken for away (after a failure, for ``retry_s``)."""
        return self._down_until is None or self._clock() >= self._down_until

    def _failed(self, exc: KnowledgeError) -> None:
        self.stats.failures += 1
        if self._down_until is None:
            log.warning("knowledge.unavailable", store=self.store.display, error=str(exc))
        self._down_until = self._clock() + self.retry_s

    def _recovered(self) -> None:
        if self._down_until is not None:
            log.info("knowledge.available", store=self.store.display)
            self._down_until = None

    async def prefetch(self, keys: Iterable[str]) -> None:
        """Load what the store knows of ``keys`` that memory does not."""
        if not self.available:
            return
        now, knowledge = self._clock(), self.knowledge
        wanted = [key for key in dict.fromkeys(keys) if knowledge.peek(key, now) is None]
        if not wanted:
            return
        wall = self._wall()
        try:
            facts = await self.store.load(wanted, wall - knowledge.ttl_s)
        except KnowledgeError as exc:
            self._failed(exc)
            return
        self._recovered()
        now = self._clock()
        for fact in facts:
            knowledge.learn(fact.key, fact.known, now - (wall - fact.learnt_at), journal=False)
        self.stats.looked_up += len(wanted)
        self.stats.loaded += len(facts)

    async def flush(self) -> None:
        """Write what the API taught since the last flush; prune now and then."""
        if not self.available:
            return
        journal = self.knowledge.drain()
        now, wall = self._clock(), self._wall()
        facts = [StoredFact(key, known, wall - (now - at)) for key, known, at in journal]
        try:
            await self.store.save(facts)
            self.stats.saved += len(facts)
            if now >= self._next_prune:
                self._next_prune = now + self.prune_interval_s
                self.stats.pruned += await self.store.prune(
                    wall - self.knowledge.ttl_s, self.knowledge.max_ids
                )
        except KnowledgeError as exc:
            self._failed(exc)
            return
        self._recovered()

    async def run(self) -> None:
        """Flush every ``flush_interval_s`` until cancelled (the caller flushes at the end)."""
        while True:
            await anyio.sleep(self.flush_interval_s)
            await self.flush()
