"""The ``redis://`` dead letters: the stream the sink writes, and a hash of what was replayed.

The URI is the one ``--dlq`` takes (the source's, so usually the same as ``--source``): the
letters are in ``<stream>:dead`` (``contacts:changes:dead`` by default), or in ``dead_stream``
(:attr:`worker.backends.redis.uri.StreamAddress.dead_letter_stream`); each entry's field
``letter`` holds one dead letter as JSON.

Replayed entries are recorded in the hash ``<dead stream>:replayed``: field = the entry ID,
value = when it was replayed (UTC), written with one ``HSET`` per page once the page is in the
input. A replay holds the key ``<dead stream>:replaying`` (``SET NX`` with a TTL, renewed every
page, deleted at the end) so that two replays of one stream cannot both send a letter.
Trimming the dead stream leaves stale fields in the hash; they are harmless (entry IDs are
never reused) and go with ``DEL <dead stream>:replayed`` once the stream is empty.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker.backends.redis.client import connect
from worker.backends.redis.scripts import RELEASE_LEASE, RENEW_LEASE
from worker.backends.redis.sink import LETTER_FIELD
from worker.backends.redis.uri import StreamAddress, parse_uri
from worker.deadletters.store import PAGE, DeadLetterStore, StoreBusy, StoreError, letter_of
from worker.deadletters.summary import Stored

LOCK_TTL_MS = 60_000
"""How long the replay lock outlives a replay that died without deleting it."""

_FIELD = LETTER_FIELD.encode()


def _parse(fields: dict[bytes, bytes]) -> dict[str, Any] | None:
    body = fields.get(_FIELD)
    if body is None:
        return None
    return letter_of(body)


class RedisStore(DeadLetterStore):
    """Reads a dead-letter stream with ``XRANGE``; marks entries in ``<stream>:replayed``."""

    def __init__(self, address: StreamAddress) -> None:
        self.address = address
        self.stream = address.dead_letter_stream
        self.replayed_key = f"{self.stream}:replayed"
        self.lock_key = f"{self.stream}:replaying"
        self.name = f"redis {address.display} {self.stream}"
        self._client: Redis | None = None
        self._lock_token: str | None = None
        self._end: bytes | None = None
        self._after: bytes | None = None

    @classmethod
    def from_uri(cls, uri: str) -> RedisStore:
        """The store a ``redis://`` URI names; ConfigError if the URI is bad."""
        return cls(parse_uri(uri))

    def _error(self, exc: BaseException) -> StoreError:
        return StoreError(f"redis {self.address.display}: {exc or type(exc).__name__}")

    @property
    def client(self) -> Redis:
        """The open connection."""
        if self._client is None:
            raise StoreError(f"{self.name}: not open")
        return self._client

    async def open(self, *, replay: bool = False) -> None:
        """Connect, check the key is a stream, fix the end at its last entry; lock for a replay."""
        self._client = client = connect(self.address)
        try:
            kind = await client.type(self.stream)
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            if kind not in ("none", "stream"):
                raise StoreError(
                    f"redis {self.address.display}: {self.stream!r} is a {kind}, not a stream"
                )
            last = cast(list[tuple[bytes, Any]], await client.xrevrange(self.stream, count=1))
            self._end = last[0][0] if last else None
            if replay:
                token = uuid.uuid4().hex
                if not await client.set(self.lock_key, token, nx=True, px=LOCK_TTL_MS):
                    raise StoreBusy(
                        f"another `dlq replay` is working on {self.stream} (it holds"
                        f" {self.lock_key}; it expires {LOCK_TTL_MS // 1000} s after a crash)"
                    )
                self._lock_token = token
        except (RedisError, OSError) as exc:
            await self.close()
            raise self._error(exc) from exc
        except StoreError:
            await self.close()
            raise

    async def read(self, size: int = PAGE) -> list[Stored]:
        """The next entries up to the last one there was at open, with their replayed flags."""
        if self._end is None:
            return []
        client = self.client
        start = b"-" if self._after is None else b"(" + self._after
        try:
            entries = cast(
                list[tuple[bytes, dict[bytes, bytes]]],
                await client.xrange(self.stream, min=start, max=self._end, count=size),
            )
            if not entries:
                self._end = None
                return []
            ids = [entry_id for entry_id, _ in entries]
            flags = await client.hmget(self.replayed_key, ids)
            if self._lock_token is not None:
                renewed = await client.eval(
                    RENEW_LEASE, 1, self.lock_key, self._lock_token, LOCK_TTL_MS
                )
                if not renewed:  # it ran out and another replay may hold it now: stop
                    raise StoreBusy(
                        f"{self.name}: the replay lock ran out (a page took more than"
                        f" {LOCK_TTL_MS // 1000} s); another replay may be running: stopped"
                    )
        except (RedisError, OSError) as exc:
            raise self._error(exc) from exc
        self._after = ids[-1]
        if self._after == self._end:
            self._end = None
        return [
            Stored(entry_id.decode(), _parse(fields), flag is not None)
            for (entry_id, fields), flag in zip(entries, flags, strict=True)
        ]

    async def mark(self, keys: Sequence[str], at: str) -> None:
        """``HSET <stream>:replayed id at ...`` for these entries."""
        if not keys:
            return
        try:
            await self.client.hset(self.replayed_key, mapping=dict.fromkeys(keys, at))
        except (RedisError, OSError) as exc:
            raise self._error(exc) from exc

    async def close(self) -> None:
        """Release the replay lock (if still ours) and disconnect."""
        client, self._client = self._client, None
        if client is None:
            return
        token, self._lock_token = self._lock_token, None
        try:
            if token is not None:
                await client.eval(RELEASE_LEASE, 1, self.lock_key, token)
        except (RedisError, OSError):
            pass  # the lock expires by itself
        finally:
            await client.aclose()
