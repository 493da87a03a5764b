"""The producer side of the ``sqlite:`` spool: ``init`` and ``enqueue --to sqlite:PATH``."""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable

from worker.backends.base import (
    EnqueueStopped,
    SourceError,
)
from worker.backends.sqlite.spool import (
    Spool,
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
    sent = 0
    chunk: list[bytes] = []
    try:
        if isinstance(lines, AsyncIterable):
            async for line in lines:
                if _add(chunk, line) >= ENQUEUE_CHUNK:
                    sent += await _flush(spool, chunk)
        else:
            for line in lines:
                if _add(chunk, line) >= ENQUEUE_CHUNK:
                    sent += await _flush(spool, chunk)
        sent += await _flush(spool, chunk)
    except SpoolError as exc:
        failed = EnqueueStopped if sent else SourceError
        raise failed(f"enqueue failed after {sent} changes: {exc}") from exc
    finally:
        await release_spool(spool)
    return sent


def _add(chunk: list[bytes], line: bytes) -> int:
    line = line.rstrip(b"\r\n")
    if line and not line.isspace():
        chunk.append(line)
    return len(chunk)


async def _flush(spool: Spool, chunk: list[bytes]) -> int:
    count = len(chunk)
    await spool.append(chunk)
    chunk.clear()
    return count
