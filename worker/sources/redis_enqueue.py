"""The producer side of the ``redis://`` input: create the group, append changes.

Wire format (any language with a Redis client can produce):

* one stream, key ``contacts:changes`` unless the URI says ``stream=KEY``;
* one entry per change, appended with ``XADD KEY * change JSON``: the field ``change`` holds the
  change as UTF-8 JSON text, exactly as one line of a ``jsonl:`` input
  (``{"ID": "123", "lastname": "Lee"}``); other fields are ignored; an entry without ``change``,
  or whose ``change`` is not a valid change, is dead-lettered ``invalid``;
* stream order is the order of the changes: append the changes of one contact from one producer
  (or in the order they happened), never with explicit IDs out of order;
* do not trim the stream (``MAXLEN``/``MINID``) past entries not yet processed; the worker deletes
  the entries it is done with unless its URI says ``delete_acked=0``.

For example: ``redis-cli XADD contacts:changes '*' change '{"ID":"123","lastname":"Lee"}'``.

The consumer group (``contact-worker`` unless ``group=NAME``) is created by :func:`init` or by
the worker on start, at ID ``0``: entries appended before it existed are read too.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker.sources.base import SourceError
from worker.sources.redis_streams import CHANGE_FIELD, connect, ensure_group, parse_uri

CHUNK = 1000
"""Entries per pipelined round trip."""


async def init(uri: str) -> None:
    """Create the stream and its consumer group if missing (idempotent)."""
    address = parse_uri(uri)
    client = connect(address)
    try:
        await ensure_group(client, address.stream, address.group)
    except (RedisError, OSError) as exc:
        raise SourceError(f"redis {address.display}: cannot create the group: {exc}") from exc
    finally:
        await client.aclose()


async def enqueue(uri: str, lines: AsyncIterable[bytes] | Iterable[bytes]) -> int:
    """Append each non-blank line as one entry (``change`` = the line); the count appended.

    Lines are sent as they are (without their line ending): validation is the worker's job.
    """
    address = parse_uri(uri)
    client = connect(address)
    sent = 0
    chunk: list[bytes] = []
    try:
        if isinstance(lines, AsyncIterable):
            async for line in lines:
                if _add(chunk, line) >= CHUNK:
                    sent += await _flush(client, address.stream, chunk)
        else:
            for line in lines:
                if _add(chunk, line) >= CHUNK:
                    sent += await _flush(client, address.stream, chunk)
        sent += await _flush(client, address.stream, chunk)
    except (RedisError, OSError) as exc:
        raise SourceError(
            f"redis {address.display}: enqueue failed after {sent} changes: {exc}"
        ) from exc
    finally:
        await client.aclose()
    return sent


def _add(chunk: list[bytes], line: bytes) -> int:
    line = line.rstrip(b"\r\n")
    if line and not line.isspace():
        chunk.append(line)
    return len(chunk)


async def _flush(client: Redis, stream: str, chunk: list[bytes]) -> int:
    if not chunk:
        return 0
    async with client.pipeline(transaction=False) as pipe:
        for line in chunk:
            pipe.xadd(stream, {CHANGE_FIELD: line})
        await pipe.execute()
    count = len(chunk)
    chunk.clear()
    return count
