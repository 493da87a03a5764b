"""ID knowledge in Redis: two sorted sets beside the input's streams.

``<stream>:ids:exists`` and ``<stream>:ids:missing``, member the ID, score the wall-clock time
it was learnt: ``ZMSCORE`` loads a slice of IDs in one round trip, a script saves a fact unless
a newer one is there, ``ZREMRANGEBYSCORE`` drops what expired and ``ZREMRANGEBYRANK`` the oldest
beyond the bound. Every replica of a (partitioned) stream shares them.
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from worker.backends.redis.client import connect
from worker.backends.redis.uri import StreamAddress
from worker.core.knowledge import Known
from worker.knowledge.base import KnowledgeError, KnowledgeStore, StoreCounts, StoredFact

SAVE_SCRIPT = """
-- KEYS[1]: the set of this kind of fact, KEYS[2]: the other kind's; ARGV: ID, time, ...
-- The newer fact of an ID wins: an older one (a slow replica's) changes nothing.
for i = 1, #ARGV, 2 do
  local id, at = ARGV[i], tonumber(ARGV[i + 1])
  local other = redis.call('ZSCORE', KEYS[2], id)
  if (not other) or tonumber(other) <= at then
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZADD', KEYS[1], 'GT', at, id)
  end
end
return 0
"""
SAVE_CHUNK = 1000
"""Facts per script call: a long script blocks the server for others meanwhile."""


class RedisKnowledge(KnowledgeStore):
    """ID knowledge in two sorted sets named after the input's stream."""

    def __init__(self, address: StreamAddress, prefix: str | None = None) -> None:
        self.address = address
        self.prefix = prefix or f"{address.stream}:ids"
        self.display = f"{address.display} {self.prefix}:{{exists,missing}}"
        self._client: Redis | None = None
        self._save: AsyncScript | None = None

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
        self._save = self._client.register_script(SAVE_SCRIPT)
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
        """Each fact into its kind's set and out of the other's, unless a newer one is there
        (one script call per kind and chunk)."""
        if not facts:
            return
        save = self._save
        if save is None:
            raise KnowledgeError(f"{self.display}: not open")
        try:
            for known in Known:
                (other,) = (k for k in Known if k is not known)
                mine = [f for f in facts if f.known is known]
                for start in range(0, len(mine), SAVE_CHUNK):
                    args: list[str | float] = []
                    for fact in mine[start : start + SAVE_CHUNK]:
                        args += [fact.key, repr(fact.learnt_at)]
                    await save(keys=[self.key(known), self.key(other)], args=args)
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

    async def forget(self, keys: Sequence[str]) -> int:
        """ZREM the keys from both sets."""
        if not keys:
            return 0
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for known in Known:
                    pipe.zrem(self.key(known), *keys)
                removed = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise KnowledgeError(f"{self.display}: {exc}") from exc
        return int(sum(removed))

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
