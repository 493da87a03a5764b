"""The producer side of the ``sqlite:`` spool: ``init`` and ``enqueue --to sqlite:PATH``."""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable

from worker.backends.base import (
    LineChunks,
    SourceError,
)
from worker.backends.sqlite.spool import (
    SpoolError,
    acquire_spool,
    parse_uri,
    release_spool,
)

ENQUEUE_CHUNK = 1000
"""Rows per transaction when enqueueing."""


async def init(uri: str) -> None:
    """Create the spool file and its tables if missing (idempotent)."""
    options = parse_uri(uri)
    try:
        spool = await acquire_spool(options.path, busy_timeout_s=options.busy_timeout_s)
    except SpoolError as exc:
        raise SourceError(str(exc)) from exc
    await release_spool(spool)


async def enqueue(uri: str, lines: AsyncIterable[bytes] | Iterable[bytes]) -> int:
    """Append each non-blank line as one row, as it is; the count appended.

    Validation is the worker's job (an invalid line is dead-lettered ``invalid`` when read);
    the HTTP ingest is the way that validates up front. Rows are committed durably in chunks of
    :data:`ENQUEUE_CHUNK`; a worker running on the same file finds them by its fallback poll.
    """
    options = parse_uri(uri)
    try:
        spool = await acquire_spool(options.path, busy_timeout_s=options.busy_timeout_s)
    except SpoolError as exc:
        raise SourceError(str(exc)) from exc
    chunks = LineChunks(ENQUEUE_CHUNK)
    try:
        return await chunks.write(lines, spool.append)
    except SpoolError as exc:
        raise chunks.failed(f"enqueue failed after {chunks.written} changes: {exc}") from exc
    finally:
        await release_spool(spool)
