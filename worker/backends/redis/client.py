"""What every Redis part shares: the client (no retries of its own), the consumer group,
and waiting out a server that is away."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import anyio
import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.backends.base import (
    Outages,
    SourceError,
)
from worker.backends.redis.rate import RedisRate
from worker.backends.redis.scripts import ACK_SCRIPT, READ_SCRIPT, START
from worker.backends.redis.uri import StreamAddress
from worker.core.backoff import RECONNECT_BACKOFF

log = structlog.get_logger("worker.backends.redis")

TRANSIENT_ERRORS: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
"""Errors that mean "the server is unreachable for now" (includes LOADING after a restart)."""


READ_LINGER_S = 0.02
"""After a read that returned only a few entries (the input is fed as it goes), wait this long
before the next: entries then come a page at a time instead of one round trip each, for a few
milliseconds of latency (20 ms at most; the engine's --linger-ms is 200 by default)."""
SMALL_READ = 256
"""Fewer entries than this in a read make the next one wait READ_LINGER_S."""


def connect(address: StreamAddress, *, read_timeout_s: float = 30.0) -> Redis:
    """A client that does not retry by itself: every connection error reaches the caller,
    which must know that a reply may have been lost (a ``XREADGROUP`` delivered but unread)."""
    return Redis.from_url(
        address.url,
        retry=Retry(NoBackoff(), 0),
        socket_timeout=read_timeout_s,
        socket_connect_timeout=5.0,
    )


async def ensure_group(client: Redis, stream: str, group: str) -> bool:
    """Create the consumer group (and the stream) if missing; True if it was created."""
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if str(exc).startswith("BUSYGROUP"):
            return False
        raise
    return True


def default_consumer() -> str:
    """``hostname-pid``: unique per process; set ``consumer=`` to a stable name per replica
    (e.g. the pod name) so that a restarted replica takes its own pending entries back at once."""
    return f"{socket.gethostname()}-{os.getpid()}"


def is_nogroup(exc: ResponseError) -> bool:
    """The group, or its whole stream, is gone: NOGROUP, or UNBLOCKED (Redis 7 ends a blocked
    XREADGROUP that way when the key or the group is deleted under it)."""
    return str(exc).startswith(("NOGROUP", "UNBLOCKED"))


async def pending_elsewhere(
    client: Redis, stream: str, group: str, consumer: str
) -> dict[str, int]:
    """Pending counts of the group's consumers other than ``consumer`` that hold entries (one
    cheap XPENDING summary)."""
    summary = await client.xpending(stream, group)
    mine = consumer.encode()
    return {
        c["name"].decode(errors="replace"): int(c["pending"])
        for c in summary.get("consumers") or ()
        if c["name"] != mine and int(c["pending"]) > 0
    }


async def claim_all(
    client: Redis, stream: str, group: str, consumer: str, min_idle_ms: int, count: int
) -> list[bytes]:
    """XAUTOCLAIM, ``count`` at a time, every entry of ``stream`` pending for ``min_idle_ms``
    in ``group``, for ``consumer``; the IDs claimed."""
    cursor: bytes = START
    claimed: list[bytes] = []
    while True:
        reply = await client.xautoclaim(stream, group, consumer, min_idle_ms, cursor, count=count)
        cursor = reply[0]
        claimed += [entry_id for entry_id, _ in reply[1]]
        if cursor == START:
            return claimed


async def back_off(
    client: Redis | None,
    address: StreamAddress,
    what: str,
    failures: int,
    exc: Exception,
    rand: Callable[[], float],
) -> None:
    """Wait before the next attempt at ``what`` while Redis is unreachable (``failures`` in a
    row so far), dropping the client's idle connections: they are dead too after a restart."""
    delay = RECONNECT_BACKOFF.delay(failures, rand())
    log.warning(
        "redis unavailable, retrying",
        during=what,
        server=address.display,
        attempt=failures,
        retry_in_s=round(delay, 3),
        error=str(exc) or type(exc).__name__,
    )
    if client is not None:
        await client.connection_pool.disconnect(inuse_connections=False)
    await anyio.sleep(delay)


class RedisClient:
    """What both Redis sources share: the client, opening it, explaining its errors,
    acknowledging, and waiting out a server that is away."""

    name: str
    address: StreamAddress
    group: str
    reconnects: int
    outages: Outages
    _client: Redis | None
    _rand: Callable[[], float]
    _read_script: AsyncScript
    _ack_script: AsyncScript

    async def _connect(self, streams: list[str], read_timeout_s: float) -> Redis:
        """A client that answered, with the consumer group on each of ``streams`` (created if
        missing) and the read and ack scripts registered; SourceError if Redis is not there."""
        client = connect(self.address, read_timeout_s=read_timeout_s)
        try:
            await client.ping()
            for stream in streams:
                if await ensure_group(client, stream, self.group):
                    log.info("consumer group created", stream=stream, group=self.group)
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise SourceError(self._explain(exc)) from exc
        self._read_script = client.register_script(READ_SCRIPT)
        self._ack_script = client.register_script(ACK_SCRIPT)
        return client

    def _wrong_type(self, exc: ResponseError) -> str:
        """What a WRONGTYPE error means for this source."""
        return str(exc)

    def _explain(self, exc: BaseException) -> str:
        where = f"redis {self.address.display}"
        if isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE"):
            return f"{where}: {self._wrong_type(exc)}"
        if isinstance(exc, RedisConnectionError | OSError | RedisTimeoutError):
            return f"cannot connect to {where}: {exc}"
        return f"{where}: {exc}"

    async def _acked(self, keys: list[str], args: list[bytes | str | int]) -> bool:
        """Run the ack script (XACK, and XDEL) over the streams ``keys`` until Redis takes it,
        waiting out outages; False if a group is gone (with its pending list: nothing to ack)."""
        failures = 0
        while True:
            try:
                await self._ack_script(keys=keys, args=args, client=self._require_client())
                self.outages.recovered("ack")
                return True
            except TRANSIENT_ERRORS as exc:
                failures += 1
                await self._back_off("ack", failures, exc)
            except ResponseError as exc:
                if not is_nogroup(exc):
                    raise SourceError(self._explain(exc)) from exc
                self.outages.recovered("ack")  # it answered
                return False

    async def _back_off(self, what: str, failures: int, exc: Exception) -> None:
        if failures == 1:
            self.reconnects += 1
        self.outages.failed(what, str(exc) or type(exc).__name__)
        await back_off(self._client, self.address, what, failures, exc, self._rand)

    def _init_client(
        self,
        address: StreamAddress,
        consumer: str | None,
        clock: Callable[[], float],
        rand: Callable[[], float],
    ) -> None:
        """The state both sources start with."""
        self.address = address
        self.group = address.group
        self.consumer = consumer or address.consumer or default_consumer()
        self.count = address.count
        self.name = f"redis:{address.stream}"
        self._clock = clock
        self._rand = rand
        self._client = None
        self._small_read = False
        """The last read brought fewer than SMALL_READ entries: the next waits READ_LINGER_S."""
        self.entries_read = 0
        self.claimed = 0
        self.acked = 0
        self.reconnects = 0
        self.outages = Outages()
        """The operations failing now (for ``statistics``)."""

    def _log_closed(self, unacked: int, **extra: int) -> None:
        """The source's counters, once it closed."""
        log.info(
            "redis source closed",
            consumer=self.consumer,
            entries_read=self.entries_read,
            claimed=self.claimed,
            acked=self.acked,
            **extra,
            reconnects=self.reconnects,
            unacked=unacked,
        )

    def shared_rate(self) -> RedisRate:
        """The account's rate, booked from ``<stream>:rate`` by every replica of this input."""
        return RedisRate(lambda: self._client, f"{self.address.stream}:rate")

    def _require_client(self) -> Redis:
        if self._client is None:
            raise SourceError(f"{self.name}: not open")
        return self._client
