"""The ``postgresql://`` dead-letter sink: one row per dead letter in ``<table>_dead``.

The URI is the outbox's (``postgresql://user@host/db?table=contact_changes``): the letters go to
the table that ``contact-worker init --to URI`` created next to the outbox, ``<table>_dead``, one
``letter jsonb`` per row, in the documented dead-letter shape. Each write is one INSERT, committed
with ``synchronous_commit = on`` before it returns, so a letter is durable before its change is
acknowledged. A write that lost its connection is retried; if its commit had gone through, the
letters are stored twice (at-least-once, like everything else).
"""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson

from worker.backends.postgres.pool import (
    CannotOpen,
    describe_error,
    pool_for_table,
    retrying,
)
from worker.backends.postgres.uri import OutboxUri, parse_uri
from worker.core.backoff import RECONNECT_BACKOFF, Backoff
from worker.deadletters.base import DeadLetterError, DeadLetterSink


class PgDeadLetters(DeadLetterSink):
    """Inserts dead letters into ``<table>_dead``; each write is durable when it returns."""

    def __init__(self, target: OutboxUri, *, backoff: Backoff = RECONNECT_BACKOFF) -> None:
        self.target = target
        self.table = target.dead
        self.name = f"postgresql:{self.table}"
        self.written = 0
        self._backoff = backoff
        self._pool: Any = None
        self._insert = (
            f"INSERT INTO {self.table} (letter)"
            " SELECT letter::jsonb FROM unnest($1::text[]) AS letter"
        )

    @classmethod
    def from_uri(cls, uri: str) -> PgDeadLetters:
        """The sink for a ``postgresql://`` URI (the outbox's; not opened yet)."""
        return cls(parse_uri(uri))

    async def open(self) -> None:
        """Connect and check that the table is there."""
        target = self.target
        try:
            self._pool, _, _ = await pool_for_table(
                target,
                f"dead letters {self.name}",
                target.table + "_dead",
                ("letter",),
                max_size=2,
                synchronous_commit="on",
            )
        except CannotOpen as exc:
            raise DeadLetterError(str(exc)) from exc

    async def write(self, letters: list[dict[str, Any]]) -> None:
        """Insert the letters in one statement; retried while the database is unreachable."""
        if not letters:
            return
        rows = [_json(letter) for letter in letters]
        insert = self._insert
        try:
            await retrying(
                "dead letter",
                self.name,
                self._pool,
                lambda conn: conn.execute(insert, rows),
                backoff=self._backoff,
            )
        except asyncpg.PostgresError as exc:
            raise DeadLetterError(f"cannot write {self.name}: {describe_error(exc)}") from exc
        self.written += len(letters)

    async def close(self) -> None:
        """Disconnect."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()


def _json(letter: dict[str, Any]) -> str:
    data = orjson.dumps(letter)
    if b"\\u0000" in data:  # jsonb refuses NUL characters (a jsonl: source may carry them)
        data = orjson.dumps(_without_nul(letter))
    return data.decode()


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value
