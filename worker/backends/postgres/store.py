"""The ``postgresql://`` dead letters: the table ``<table>_dead`` beside the outbox.

The URI is the outbox's (the one ``--dlq`` and ``--source`` take: ``table`` and ``schema`` name
the outbox; the letters are in ``<table>_dead``). Replayed rows get ``replayed_at`` set (the
column ``contact-worker init --to URI`` adds, also to a table created by an older version);
``dlq show`` works without it, ``dlq replay`` asks for ``init`` first. A replay holds the
session-level advisory lock ``(ADVISORY_CLASS, <dead table oid>)`` so that two replays of one
table cannot both send a letter; it goes with the connection, also when the process dies.

When the replay's input is the outbox of the same database, the rows are inserted and marked in
one transaction (:meth:`PgStore.insert_and_mark`): each letter is replayed exactly once.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import asyncpg

from worker.backends.postgres.pool import (
    CONNECT_TIMEOUT_S,
    DATABASE_ERRORS,
    OPEN_ERRORS,
    MissingTable,
    describe_error,
    find_table,
    in_transaction,
)
from worker.backends.postgres.producer import insert_rows, outbox_row
from worker.backends.postgres.uri import ADVISORY_CLASS, OutboxUri, parse_uri
from worker.deadletters.store import PAGE, DeadLetterStore, IdPages, StoreBusy, StoreError
from worker.deadletters.summary import Stored

REPLAYED_COLUMN = "replayed_at"


def _when(at: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(at)


class PgStore(DeadLetterStore):
    """Reads ``<table>_dead`` in ``id`` order; marks rows by setting ``replayed_at``."""

    def __init__(self, target: OutboxUri) -> None:
        self.target = target
        self.table = target.dead
        self.name = f"postgresql {target.display} {self.table}"
        self._conn: Any = None
        self._has_column = False
        self._pages = IdPages()

    @classmethod
    def from_uri(cls, uri: str) -> PgStore:
        """The store a ``postgresql://`` URI names; ConfigError if the URI is bad."""
        return cls(parse_uri(uri))

    def _error(self, exc: BaseException) -> StoreError:
        return StoreError(f"{self.table} in {self.target.display}: {describe_error(exc)}")

    async def open(self, *, replay: bool = False) -> None:
        """Connect, find the table, fix the end at its highest id; lock it for a replay."""
        target = self.target
        try:
            self._conn = conn = await asyncpg.connect(
                target.dsn, timeout=CONNECT_TIMEOUT_S, server_settings=target.server_settings
            )
        except OPEN_ERRORS as exc:
            raise StoreError(f"cannot connect to {target.display}: {describe_error(exc)}") from exc
        try:
            oid, _ = await find_table(conn, target, target.table + "_dead", ("id", "letter"))
            self._has_column = bool(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_attribute"
                    " WHERE attrelid = $1::bigint::oid AND attname = $2 AND NOT attisdropped",
                    oid,
                    REPLAYED_COLUMN,
                )
            )
            if replay:
                if not self._has_column:
                    raise StoreError(
                        f"{self.table} in {target.display} has no column {REPLAYED_COLUMN} to"
                        " mark replayed letters: run `contact-worker init --to URI` first"
                        " (it adds the column; idempotent)"
                    )
                lock_key = oid - (1 << 32) if oid >= 1 << 31 else oid  # the lock takes an int4
                locked = await conn.fetchval(
                    "SELECT pg_try_advisory_lock($1::int, $2::int)", ADVISORY_CLASS, lock_key
                )
                if not locked:
                    raise StoreBusy(f"another `dlq replay` is working on {self.table}")
            self._pages.end = int(
                await conn.fetchval(f"SELECT coalesce(max(id), 0) FROM {self.table}")
            )
        except MissingTable as exc:
            await self.close()
            raise StoreError(str(exc)) from exc
        except DATABASE_ERRORS as exc:
            await self.close()
            raise self._error(exc) from exc
        except StoreError:
            await self.close()
            raise

    @property
    def conn(self) -> Any:
        """The open connection."""
        if self._conn is None:
            raise StoreError(f"{self.name}: not open")
        return self._conn

    async def read(self, size: int = PAGE) -> list[Stored]:
        """The next rows up to the highest id there was at open."""
        if self._pages.done:
            return []
        replayed = f"{REPLAYED_COLUMN} IS NOT NULL" if self._has_column else "false"
        try:
            rows = await self.conn.fetch(
                f"SELECT id, letter::text, {replayed} FROM {self.table}"
                " WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3",
                self._pages.after,
                self._pages.end,
                size,
            )
        except DATABASE_ERRORS as exc:
            raise self._error(exc) from exc
        return self._pages.letters(rows)

    async def mark(self, keys: Sequence[str], at: str) -> None:
        """``UPDATE ... SET replayed_at`` on these rows, in one statement (autocommit)."""
        if not keys:
            return
        try:
            await self.conn.execute(self._mark_sql, [int(key) for key in keys], _when(at))
        except DATABASE_ERRORS as exc:
            raise self._error(exc) from exc

    @property
    def _mark_sql(self) -> str:
        return (
            f"UPDATE {self.table} SET {REPLAYED_COLUMN} = $2"
            f" WHERE id = ANY($1::bigint[]) AND {REPLAYED_COLUMN} IS NULL"
        )

    def holds_input(self, uri: str) -> bool:
        """Whether the input ``uri`` is an outbox in this store's database (same connection
        string): then a replay inserts and marks in one transaction."""
        scheme = uri.partition(":")[0]
        return scheme in ("postgresql", "postgres") and parse_uri(uri).dsn == self.target.dsn

    async def insert_and_mark(
        self, uri: str, keys: Sequence[str], lines: Sequence[bytes], at: str
    ) -> int:
        """Insert the changes into the outbox ``uri`` names and mark their letters, in one
        transaction: both happen or neither. The rows inserted (partitioned like ``enqueue``)."""
        target = parse_uri(uri)
        ids: list[str] = []
        changes: list[str] = []
        for line in lines:
            row = outbox_row(line)
            if row is not None:
                ids.append(row[0])
                changes.append(row[1])
        insert, extra = insert_rows(target.outbox, target.partitions)
        args: list[Any] = [ids, changes, *extra(ids)]
        conn = self.conn

        async def both() -> None:
            await conn.execute(insert, *args)
            await conn.execute(self._mark_sql, [int(key) for key in keys], _when(at))

        try:
            await in_transaction(conn, "SET LOCAL synchronous_commit = on", both)
        except DATABASE_ERRORS as exc:
            raise StoreError(f"{target.outbox} in {target.display}: {describe_error(exc)}") from exc
        return len(ids)

    async def close(self) -> None:
        """Disconnect (which releases the advisory lock)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except (*DATABASE_ERRORS, asyncpg.InterfaceError):
                conn.terminate()
