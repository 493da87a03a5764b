"""The producer side of the ``postgresql://`` outbox: create the tables, insert changes.

The wire format, for producers in any language: one row per change in the outbox table (default
``contact_changes``; the DDL is :data:`worker.backends.postgres.uri.DDL`, PostgreSQL 14 or newer)::

    INSERT INTO contact_changes (contact_id, change)
    VALUES ('123', '{"ID": "123", "lastname": "Lee"}');

- ``change`` (jsonb) is one change object, exactly as a line of a ``jsonl:`` input.
- ``contact_id`` (text) is the string form of the change's ``ID`` (``123`` and ``"123"`` are both
  ``'123'``). The worker sends the ID in ``change``; a row whose ``contact_id`` differs from it is
  dead-lettered ``invalid`` (it was ordered and partitioned as another contact's).
- ``partition`` (integer, default 0): with ``partitions=P`` (P > 1) on the workers' URI, set it to
  CRC-32 (IEEE, as zlib, Java's ``CRC32`` and Go's ``crc32.ChecksumIEEE`` compute it) of the
  UTF-8 bytes of ``contact_id``, modulo P (:func:`worker.core.partition.partition_of`); in SQL,
  for example with a producer-side function. Every producer and every replica must use the same P.
  Rows with another value are never claimed; a row in another partition than its ID's is
  dead-lettered ``invalid``. With P = 1 leave it at its default.
- ``id``, ``created_at``, ``claimed_by`` and ``claimed_until`` are left to their defaults.
- Insert the row in the same transaction as the write it reports (the transactional outbox).
  Changes to one contact are sent in ``id`` order, so insert after the statement that locks that
  contact's row: two transactions changing one contact then take their ids in commit order.
- The trigger notifies the channel ``<schema>.<table>`` (e.g. ``public.contact_changes``) once
  per inserting statement; the worker polls every few seconds anyway.

A change the worker cannot send (no ID, an unknown field, a wrong type, not an object) is
dead-lettered ``invalid`` in ``<table>_dead`` and its row deleted, like any finished row.

``enqueue`` (``contact-worker enqueue --to``) stores a line that is not valid JSON as a JSON
string holding the line's text, with ``contact_id`` ``''``; the worker decodes that text as the
``jsonl:`` source would, so the dead letter shows the original line in ``raw``. A line holding a
NUL character (``\\u0000``, which jsonb refuses) is stored the same way, with its ID's
``contact_id``. A valid JSON line without a usable ``ID`` is stored as it is, also with
``contact_id`` ``''``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import asyncpg
import orjson

from worker.backends.base import EnqueueStopped, SourceError
from worker.backends.postgres.pool import (
    CONNECT_TIMEOUT_S,
    DATABASE_ERRORS,
    OPEN_ERRORS,
    create_if_missing,
    describe_error,
)
from worker.backends.postgres.uri import OutboxUri, ddl, parse_uri
from worker.core.change import key_of
from worker.core.partition import partition_of

CHUNK_ROWS = 5000
"""Rows per INSERT (and per commit): the worker can start on a long stream before it ends."""


def outbox_row(line: bytes | str) -> tuple[str, str] | None:
    """The ``(contact_id, change)`` row for one JSONL line; None for a blank line."""
    data = line.encode() if isinstance(line, str) else line
    data = data.rstrip(b"\r\n")  # the rest is kept: a raw line reaches its dead letter as it was
    if not data or data.isspace():
        return None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return "", _raw(data)
    key = key_of(obj.get("ID")) if type(obj) is dict else None
    if b"\\u0000" in data:
        # jsonb refuses NUL characters: the worker decodes the text. The row keeps its
        # contact_id (and so its partition): it is still that contact's change.
        return key or "", _raw(data)
    return key or "", data.decode()


def _raw(data: bytes) -> str:
    """A JSON string holding the line's text (PostgreSQL text holds no NUL either)."""
    text = data.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
    return orjson.dumps(text).decode()


async def _connect(target: OutboxUri) -> Any:
    try:
        return await asyncpg.connect(
            target.dsn, timeout=CONNECT_TIMEOUT_S, server_settings=target.server_settings
        )
    except OPEN_ERRORS as exc:
        raise SourceError(f"cannot connect to {target.display}: {describe_error(exc)}") from exc


async def init(uri: str) -> None:
    """Create the outbox table, its dead-letter table and trigger, if missing (idempotent)."""
    target = parse_uri(uri)
    conn = await _connect(target)
    try:
        await create_if_missing(conn, ddl(target.table, target.schema))
    except DATABASE_ERRORS as exc:
        raise SourceError(
            f"cannot create {target.outbox} in {target.display}: {describe_error(exc)}"
        ) from exc
    finally:
        await conn.close()


def insert_rows(outbox: str, partitions: int) -> tuple[str, Callable[[list[str]], list[Any]]]:
    """The INSERT of rows (contact IDs, changes) in their order into ``outbox``, and what
    turns the contact IDs into the statement's arguments after the changes (the partitions
    when there are several, nothing else)."""
    if partitions > 1:
        insert = (
            f"INSERT INTO {outbox} (contact_id, change, partition)"
            " SELECT contact_id, change::jsonb, part"
            " FROM unnest($1::text[], $2::text[], $3::int[])"
            " WITH ORDINALITY AS u(contact_id, change, part, n)"
            " ORDER BY n"
        )
        return insert, lambda ids: [[partition_of(key, partitions) for key in ids]]
    insert = (
        f"INSERT INTO {outbox} (contact_id, change)"
        " SELECT contact_id, change::jsonb"
        " FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(contact_id, change, n)"
        " ORDER BY n"
    )
    return insert, lambda ids: []


async def enqueue(uri: str, lines: Iterable[bytes | str]) -> int:
    """Insert one row per non-blank JSONL line, in line order; the number of rows inserted.

    With ``partitions=P`` (P > 1) in the URI each row gets ``partition_of(contact_id, P)``."""
    target = parse_uri(uri)
    insert, extra = insert_rows(target.outbox, target.partitions)

    async def write(conn: Any, ids: list[str], changes: list[str]) -> None:
        await conn.execute(insert, ids, changes, *extra(ids))

    conn = await _connect(target)
    count = 0
    try:
        ids: list[str] = []
        changes: list[str] = []
        for line in lines:
            row = outbox_row(line)
            if row is None:
                continue
            ids.append(row[0])
            changes.append(row[1])
            if len(ids) >= CHUNK_ROWS:
                await write(conn, ids, changes)
                count += len(ids)
                ids, changes = [], []
        if ids:
            await write(conn, ids, changes)
            count += len(ids)
    except DATABASE_ERRORS as exc:
        failed = EnqueueStopped if count else SourceError
        raise failed(
            f"enqueue into {target.outbox} in {target.display} stopped after {count} rows:"
            f" {describe_error(exc)}"
        ) from exc
    finally:
        await conn.close()
    return count
