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
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.backends.base import (
    Outages,
    SourceError,
)
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


class RedisClient:
    """What both Redis sources share: the client, and waiting out a server that is away."""

    name: str
    address: StreamAddress
    reconnects: int
    outages: Outages
    _client: Redis | None
    _rand: Callable[[], float]

    async def _back_off(self, what: str, failures: int, exc: Exception) -> None:
        delay = RECONNECT_BACKOFF.delay(failures, self._rand())
        if failures == 1:
            self.reconnects += 1
        self.outages.failed(what, str(exc) or type(exc).__name__)
        log.warning(
            "redis unavailable, retrying",
            during=what,
            server=self.address.display,
            attempt=failures,
            retry_in_s=round(delay, 3),
            error=str(exc) or type(exc).__name__,
        )
        client = self._client
        if client is not None:
            # Idle pooled connections are dead too after a restart: drop them all at once.
            await client.connection_pool.disconnect(inuse_connections=False)
        await anyio.sleep(delay)

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

    def _require_client(self) -> Redis:
        if self._client is None:
            raise SourceError(f"{self.name}: not open")
        return self._client
