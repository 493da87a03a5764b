"""ID knowledge in PostgreSQL: a table beside the outbox, ``<table>_ids``.

``(id text PRIMARY KEY, known boolean, learnt_at double precision)`` with an index on
``(known, learnt_at)`` for pruning; created at start if missing. ``= ANY($1)`` loads a slice of
IDs in one round trip; ``INSERT .. ON CONFLICT`` keeps the newer fact. Every replica of a
(partitioned) outbox shares it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from worker.backends.postgres.pool import close_pool, create_if_missing, create_pool
from worker.backends.postgres.uri import OutboxUri
from worker.core.knowledge import Known
from worker.knowledge.base import KnowledgeError, KnowledgeStore, StoreCounts, StoredFact

ERRORS: tuple[type[BaseException], ...] = (asyncpg.PostgresError, OSError, asyncpg.InterfaceError)


class PostgresKnowledge(KnowledgeStore):
    """ID knowledge in the table ``<outbox>_ids``."""

    def __init__(self, target: OutboxUri, table: str | None = None) -> None:
        self.target = target
        self.table = table or target.qualify(target.table + "_ids")
        self.display = f"{target.display} ({self.table})"
        self._pool: Any = None

    async def _call(self, sql: str, *args: Any, fetch: bool = False) -> Any:
        if self._pool is None:
            raise KnowledgeError(f"{self.display}: not open")
        try:
            async with self._pool.acquire() as conn:
                if fetch:
                    return await conn.fetch(sql, *args)
                return await conn.execute(sql, *args)
        except ERRORS as exc:
            raise KnowledgeError(f"{self.display}: {exc}") from exc

    async def open(self) -> None:
        """Connect and create the table if it is missing."""
        try:
            self._pool = await create_pool(self.target, max_size=2)
        except ERRORS as exc:
            raise KnowledgeError(f"{self.display}: {exc}") from exc
        name = self.table.rpartition(".")[2]
        try:
            async with self._pool.acquire() as conn:
                await create_if_missing(  # replicas starting together take turns
                    conn,
                    f"CREATE TABLE IF NOT EXISTS {self.table} (id text PRIMARY KEY,"
                    " known boolean NOT NULL, learnt_at double precision NOT NULL);"
                    f" CREATE INDEX IF NOT EXISTS {name}_learnt_at"
                    f" ON {self.table} (known, learnt_at)",
                )
        except ERRORS as exc:
            raise KnowledgeError(f"{self.display}: {exc}") from exc

    async def close(self) -> None:
        """Close the pool."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await close_pool(pool)

    async def load(self, keys: Sequence[str], since: float) -> list[StoredFact]:
        """The live facts about ``keys``."""
        if not keys:
            return []
        rows = await self._call(
            f"SELECT id, known, learnt_at FROM {self.table} WHERE id = ANY($1) AND learnt_at > $2",
            list(keys),
            since,
            fetch=True,
        )
        return [StoredFact(r[0], Known.EXISTS if r[1] else Known.MISSING, r[2]) for r in rows]

    async def save(self, facts: Sequence[StoredFact]) -> None:
        """Upsert ``facts`` in one statement (the newer fact of an ID wins)."""
        if not facts:
            return
        newest: dict[str, StoredFact] = {}
        for fact in facts:  # one row per ID: ON CONFLICT cannot touch a row twice
            if fact.key not in newest or fact.learnt_at >= newest[fact.key].learnt_at:
                newest[fact.key] = fact
        await self._call(
            f"INSERT INTO {self.table} AS t (id, known, learnt_at)"
            " SELECT * FROM unnest($1::text[], $2::boolean[], $3::double precision[])"
            " ON CONFLICT (id) DO UPDATE SET known = excluded.known,"
            " learnt_at = excluded.learnt_at WHERE excluded.learnt_at >= t.learnt_at",
            [f.key for f in newest.values()],
            [f.known is Known.EXISTS for f in newest.values()],
            [f.learnt_at for f in newest.values()],
        )

    async def forget(self, keys: Sequence[str]) -> None:
        """Delete the facts about ``keys``."""
        if keys:
            await self._call(f"DELETE FROM {self.table} WHERE id = ANY($1)", list(keys))

    async def prune(self, before: float, max_ids: int) -> int:
        """Drop expired facts, then the oldest beyond ``max_ids`` of each kind."""
        status = await self._call(f"DELETE FROM {self.table} WHERE learnt_at <= $1", before)
        count = int(status.split()[-1])
        for known in (True, False):
            status = await self._call(
                f"DELETE FROM {self.table} WHERE id IN (SELECT id FROM {self.table}"
                " WHERE known = $1 ORDER BY learnt_at DESC OFFSET $2)",
                known,
                max_ids,
            )
            count += int(status.split()[-1])
        return count

    async def clear(self) -> int:
        """Forget everything."""
        status = await self._call(f"DELETE FROM {self.table}")
        return int(status.split()[-1])

    async def counts(self) -> StoreCounts:
        """Facts held, by kind."""
        rows = await self._call(
            f"SELECT known, count(*) FROM {self.table} GROUP BY known", fetch=True
        )
        found = {r[0]: r[1] for r in rows}
        return StoreCounts(found.get(True, 0), found.get(False, 0))
