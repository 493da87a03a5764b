"""The ``redis://`` dead-letter sink: each dead letter is a stream entry.

URI: the same as the ``redis://`` source's (so ``--dlq`` may repeat ``--source``): dead letters go
to the stream ``<stream>:dead`` (default ``contacts:changes:dead``), or to ``dead_stream=KEY``.
The source-only parameters (``group``, ``consumer``, ...) are ignored here.

Each entry has one field, ``letter``: the dead letter as JSON, in the documented shape
(:func:`worker.deadletters.base.record`). Read them with e.g.
``redis-cli XRANGE contacts:changes:dead - +``.

Durability is what the Redis server is configured for, no more: a write returns once Redis
answered the MULTI/EXEC, which with ``appendonly yes`` and ``appendfsync always`` means the letters
are fsynced to its AOF; with ``appendfsync everysec`` up to a second of them can be lost in a
crash; with ``appendonly no`` (the CI Redis here runs with ``--appendonly no --save ""``) nothing
survives a restart of Redis. The source's entries live on the same server, so an ack is never
more durable than the dead letter it depends on.

A write that fails because Redis is unreachable is retried with backoff until it succeeds (the
engine waits, acknowledging nothing meanwhile); if the connection dropped after Redis ran the
transaction, the retry writes the letters a second time: dead letters are at-least-once too.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker.backends.redis.client import TRANSIENT_ERRORS, back_off, connect
from worker.backends.redis.uri import StreamAddress, parse_uri
from worker.deadletters.base import DeadLetterError, DeadLetterSink

LETTER_FIELD = "letter"
"""The entry field holding the dead letter's JSON."""


class RedisStreamDeadLetters(DeadLetterSink):
    """Appends dead letters to a Redis stream, one MULTI/EXEC transaction per write."""

    def __init__(
        self, address: StreamAddress, *, rand: Callable[[], float] = random.random
    ) -> None:
        self.address = address
        self.stream = address.dead_letter_stream
        self.name = f"redis:{self.stream}"
        self._rand = rand
        self._client: Redis | None = None
        self.written = 0

    async def open(self) -> None:
        """Connect; DeadLetterError if Redis is unreachable or the key is not a stream."""
        client = connect(self.address)
        try:
            reply = await client.type(self.stream)
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise DeadLetterError(
                f"cannot connect to redis {self.address.display} for dead letters: {exc}"
            ) from exc
        kind = reply.decode() if isinstance(reply, bytes) else str(reply)
        if kind not in ("none", "stream"):
            await client.aclose()
            raise DeadLetterError(
                f"redis {self.address.display}: dead-letter key {self.stream!r} exists and is"
                f" a {kind}, not a stream"
            )
        self._client = client

    async def write(self, letters: list[dict[str, Any]]) -> None:
        """XADD each letter inside one MULTI/EXEC; retried while Redis is unreachable."""
        if not letters:
            return
        client = self._client
        if client is None:
            raise DeadLetterError(f"{self.name}: not open")
        bodies = [orjson.dumps(letter) for letter in letters]
        failures = 0
        while True:
            try:
                async with client.pipeline(transaction=True) as pipe:
                    for body in bodies:
                        pipe.xadd(self.stream, {LETTER_FIELD: body})
                    await pipe.execute()
                break
            except TRANSIENT_ERRORS as exc:
                failures += 1
                await back_off(client, self.address, "dead letters", failures, exc, self._rand)
            except RedisError as exc:
                raise DeadLetterError(f"cannot write dead letters to {self.name}: {exc}") from exc
        self.written += len(letters)

    async def close(self) -> None:
        """Disconnect."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


def from_uri(uri: str) -> RedisStreamDeadLetters:
    """The sink a ``redis://`` URI names (not opened yet); ConfigError if the URI is bad."""
    return RedisStreamDeadLetters(parse_uri(uri))
