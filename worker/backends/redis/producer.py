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

Partitioned (``partitions=P``, P > 1): the streams are ``KEY:0`` .. ``KEY:P-1`` and a change goes
to ``KEY:p`` with ``p = CRC-32(UTF-8 bytes of the ID's string form) mod P``
(:func:`worker.core.partition.partition_of`; zlib's / Java's / Go's IEEE CRC-32; an integer ID
``123`` hashes as ``"123"``). Every producer must use this hash and the same P, or the changes of
one contact land in two partitions and lose their order: a change found in another partition's
stream is dead-lettered ``invalid``, never sent. Lines that are not a JSON object with an
``ID`` go to partition 0 (the worker dead-letters them). The keys ``KEY:p:lease`` and
``KEY:members`` belong to the workers (leases and live replicas): do not write them.

The consumer group (``contact-worker`` unless ``group=NAME``) is created by :func:`init` or by
the worker on start, at ID ``0``: entries appended before it existed are read too.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker.backends.base import LineChunks, SourceError
from worker.backends.redis.client import connect, ensure_group
from worker.backends.redis.scripts import CHANGE_FIELD
from worker.backends.redis.uri import parse_uri
from worker.core.partition import partition_of

CHUNK = 1000
"""Entries per pipelined round trip."""


async def init(uri: str) -> None:
    """Create the stream(s) and the consumer group on each if missing (idempotent)."""
    address = parse_uri(uri)
    client = connect(address)
    try:
        for stream in address.partition_streams:
            await ensure_group(client, stream, address.group)
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
    streams = address.partition_streams
    try:
        await client.ping()  # connects: a Redis that is not there fails before anything is read
    except (RedisError, OSError) as exc:
        await client.aclose()
        raise SourceError(f"cannot connect to redis {address.display}: {exc}") from exc
    chunks = LineChunks(CHUNK)
    try:
        return await chunks.write(lines, lambda chunk: _append(client, streams, chunk))
    except (RedisError, OSError) as exc:
        message = f"redis {address.display}: enqueue failed after {chunks.written} changes: {exc}"
        raise chunks.failed(message) from exc
    finally:
        await client.aclose()


def partition_of_line(line: bytes, partitions: int) -> int:
    """The partition of one change line: by its ID, or 0 if it has none (or is not JSON)."""
    if partitions <= 1:
        return 0
    try:
        change = orjson.loads(line)
    except orjson.JSONDecodeError:
        return 0
    if not isinstance(change, dict):
        return 0
    key = change.get("ID")
    if isinstance(key, bool) or not isinstance(key, str | int):
        return 0
    return partition_of(str(key), partitions)


async def _append(client: Redis, streams: list[str], chunk: list[bytes]) -> None:
    """XADD each line to its partition's stream, pipelined (one round trip)."""
    partitions = len(streams)
    async with client.pipeline(transaction=False) as pipe:
        for line in chunk:
            pipe.xadd(streams[partition_of_line(line, partitions)], {CHANGE_FIELD: line})
        await pipe.execute()
