"""ID knowledge in Redis: two sorted sets beside the input's streams.

``<stream>:ids:exists`` and ``<stream>:ids:missing``, member the ID, score the wall-clock time
it was learnt: ``ZMSCORE`` loads a slice of IDs in one round trip, ``ZREMRANGEBYSCORE`` drops
what expired and ``ZREMRANGEBYRANK`` the oldest beyond the bound. Every replica of a
(partitioned) stream shares them.
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker.backends.redis.client import connect
from worker.backends.redis.uri import StreamAddress
from worker.core.knowledge import Known
from worker.knowledge.base import KnowledgeError, KnowledgeStore, StoreCounts, StoredFact


class RedisKnowledge(KnowledgeStore):
    """ID knowledge in two sorted sets named after the input's stream."""

    def __init__(self, address: StreamAddress, prefix: str | None = None) -> None:
        self.address = address
        self.prefix = prefix or f"{address.stream}:ids"
        self.display = f"{address.display} {self.prefix}:{{exists,missing}}"
        self._client: Redis | None = None

    def key(self, known: Known) -> str:
        """The sorted set of one kind of fact."""
        return f"{self.prefix}:{known.value}"

    @property
    def client(self) -> Redis:
        if self._client is None:
            raise KnowledgeError(f"{self.display}: not open")
        return self._client

    async def open(self) -> None:
        """Connect (nothing to create: sorted sets appear with their first member)."""
        self._client = connect(self.address, read_timeout_s=10.0)
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            raise KnowledgeError(f"{self.display}: {exc}") from exc

    async def close(self) -> None:
        """Disconnect."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def load(self, keys: Sequence[str], since: float) -> list[StoredFact]:
        """The live facts about ``keys``: one ZMSCORE per kind, pipelined."""
        if not keys:
            return []
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for known in Known:
                    pipe.zmscore(self.key(known), list(keys))
                scores = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise KnowledgeError(f"{self.display}: {exc}") from exc
        best: dict[str, StoredFact] = {}
        for known, found in zip(Known, scores, strict=True):
            for key, at in zip(keys, found, strict=True):
                if at is None or at <= since:
                    continue
                old = best.get(key)
                if old is None or at > old.learnt_at:
                    best[key] = StoredFact(key, known, at)
        return list(best.values())

    async def save(self, facts: Sequence[StoredFact]) -> None:
        """ZADD each fact to its kind and ZREM it from the other, pipelined."""
        if not facts:
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for known in Known:
                    mine = {f.key: f.learnt_at for f in facts if f.known is known}
                    if mine:
                        pipe.zadd(self.key(known), mine)
                        for other in Known:
                            if other is not known:
                                pipe.zrem(self.key(other), *mine)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise KnowledgeError(f"{self.display}: {exc}") from exc

    async def prune(self, before: float, max_ids: int) -> int:
        """Drop expired members, then the oldest beyond ``max_ids`` of each set."""
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for known in Known:
                    pipe.zremrangebyscore(self.key(known), "-inf", before)
                    pipe.zremrangebyrank(self.key(known), 0, -max_ids - 1)
                dropped = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise KnowledgeError(f"{self.display}: {exc}") from exc
        return int(sum(dropped))

    async def clear(self) -> int:
        """Delete both sets."""
        counts = await self.counts()
        try:
            await self.client.delete(*(self.key(known) for known in Known))
        except (RedisError, OSError) as exc:
            raise KnowledgeError(f"{self.display}: {exc}") from exc
        return counts.exists + counts.missing

    async def counts(self) -> StoreCounts:
        """ZCARD of each set."""
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for known in (Known.EXISTS, Known.MISSING):
                    pipe.zcard(self.key(known))
                exists, missing = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise KnowledgeError(f"{self.display}: {exc}") from exc
        return StoreCounts(int(exists), int(missing))
