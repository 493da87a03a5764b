"""ID knowledge in SQLite: a table of the ``sqlite:`` spool, or the file of ``--state sqlite:``.

``id_knowledge(id TEXT PRIMARY KEY, known INTEGER, learnt_at REAL) WITHOUT ROWID`` with an index
on ``learnt_at`` for pruning. One connection, used from one worker thread at a time.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import TypeVar

import anyio
import anyio.to_thread

from worker.core.knowledge import Known
from worker.knowledge.base import KnowledgeError, KnowledgeStore, StoreCounts, StoredFact

TABLE = "id_knowledge"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id TEXT PRIMARY KEY,
    known INTEGER NOT NULL,
    learnt_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS {TABLE}_learnt_at ON {TABLE} (known, learnt_at);
"""
CODES = {Known.EXISTS: 1, Known.MISSING: 0}
KINDS = {code: known for known, code in CODES.items()}
T = TypeVar("T")
CHUNK = 500
"""IDs per SELECT (SQLite allows 32,766 parameters; smaller statements plan faster)."""


class SqliteKnowledge(KnowledgeStore):
    """ID knowledge in the table ``id_knowledge`` of the SQLite file ``path``."""

    def __init__(self, path: str, *, busy_timeout_s: float = 5.0) -> None:
        self.path = path
        self.display = f"sqlite:{path} ({TABLE})"
        self.busy_timeout_s = busy_timeout_s
        self._conn: sqlite3.Connection | None = None
        self._lock = anyio.Lock()

    async def open(self) -> None:
        """Open the file (created if missing) and the table."""
        await self._run(lambda conn: conn.executescript(SCHEMA))

    async def close(self) -> None:
        """Close the connection."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await anyio.to_thread.run_sync(conn.close)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # a lost fact costs requests, not changes
        return conn

    async def _run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        async with self._lock:

            def call() -> T:
                if self._conn is None:
                    self._conn = self._connect()
                return op(self._conn)

            try:
                return await anyio.to_thread.run_sync(call)
            except sqlite3.Error as exc:
                raise KnowledgeError(f"{self.display}: {exc}") from exc

    async def load(self, keys: Sequence[str], since: float) -> list[StoredFact]:
        """The live facts about ``keys``."""
        if not keys:
            return []

        def op(conn: sqlite3.Connection) -> list[StoredFact]:
            found = []
            for start in range(0, len(keys), CHUNK):
                chunk = keys[start : start + CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT id, known, learnt_at FROM {TABLE}"
                    f" WHERE id IN ({marks}) AND learnt_at > ?",
                    (*chunk, since),
                )
                found += [StoredFact(key, KINDS[code], at) for key, code, at in rows]
            return found

        return await self._run(op)

    async def save(self, facts: Sequence[StoredFact]) -> None:
        """Upsert ``facts`` in one transaction."""
        if not facts:
            return
        rows = [(f.key, CODES[f.known], f.learnt_at) for f in facts]

        def op(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.executemany(
                    f"INSERT INTO {TABLE} (id, known, learnt_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (id) DO UPDATE SET known = excluded.known,"
                    " learnt_at = excluded.learnt_at WHERE excluded.learnt_at >= learnt_at",
                    rows,
                )

        await self._run(op)

    async def prune(self, before: float, max_ids: int) -> int:
        """Drop expired facts, then the oldest beyond ``max_ids`` of each kind."""

        def op(conn: sqlite3.Connection) -> int:
            with _transaction(conn):
                dropped = conn.execute(f"DELETE FROM {TABLE} WHERE learnt_at <= ?", (before,))
                count = dropped.rowcount
                for code in KINDS:
                    over = conn.execute(
                        f"DELETE FROM {TABLE} WHERE known = ? AND id IN (SELECT id FROM {TABLE}"
                        " WHERE known = ? ORDER BY learnt_at DESC LIMIT -1 OFFSET ?)",
                        (code, code, max_ids),
                    )
                    count += over.rowcount
            return count

        return await self._run(op)

    async def clear(self) -> int:
        """Forget everything."""
        return await self._run(lambda conn: conn.execute(f"DELETE FROM {TABLE}").rowcount)

    async def forget(self, keys: Sequence[str]) -> int:
        """Delete the facts of ``keys``."""

        def op(conn: sqlite3.Connection) -> int:
            dropped = 0
            with _transaction(conn):
                for start in range(0, len(keys), 500):
                    chunk = list(keys[start : start + 500])
                    marks = ",".join("?" * len(chunk))
                    query = f"DELETE FROM {TABLE} WHERE id IN ({marks})"
                    dropped += conn.execute(query, chunk).rowcount
            return dropped

        return await self._run(op)

    async def counts(self) -> StoreCounts:
        """Facts held, by kind."""

        def op(conn: sqlite3.Connection) -> StoreCounts:
            rows = dict(conn.execute(f"SELECT known, count(*) FROM {TABLE} GROUP BY known"))
            return StoreCounts(rows.get(CODES[Known.EXISTS], 0), rows.get(CODES[Known.MISSING], 0))

        return await self._run(op)


class _transaction:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *rest: object) -> None:
        self.conn.execute("ROLLBACK" if kind is not None else "COMMIT")
