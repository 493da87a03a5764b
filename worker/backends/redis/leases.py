"""The partition leases of a partitioned Redis input: take, renew, give back, release, lose."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import anyio
import structlog
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from worker.backends.base import (
    Record,
    ReplayRanges,
    Source,
)
from worker.backends.redis.client import (
    RedisClient,
)
from worker.backends.redis.scripts import (
    START,
)
from worker.backends.redis.uri import (
    StreamAddress,
)
from worker.core.partition import partition_of

log = structlog.get_logger("worker.backends.redis")

PartitionToken = tuple[int, bytes]
"""A partitioned record's token: its partition and its entry ID."""


@dataclass(slots=True)
class Held:
    """A partition this consumer holds the lease of."""

    claimed: bool = False
    """Entries pending at other consumers were taken over (done first, once per holding)."""
    scan_from: bytes | None = START
    """Where the re-read of this consumer's own pending entries stands; None once done."""
    replaying: bool = True
    """Its pending entries (claimed and own) are a replay range not read to the end yet."""


class PartitionLeases(RedisClient, Source):
    """The state of a partitioned source and the keeper of its leases; reading is
    :class:`~worker.backends.redis.partitioned.PartitionedRedisSource`'s."""

    _renew_script: AsyncScript
    _release_script: AsyncScript
    _heartbeat_script: AsyncScript

    def __init__(
        self,
        address: StreamAddress,
        *,
        consumer: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._init_client(address, consumer, clock, rand)
        self.partitions = address.partitions
        self.streams = address.partition_streams
        self.lease_ms = address.lease_ms
        self.members_key = f"{address.stream}:members"
        self._block_ms = max(1, min(address.block_ms, address.lease_ms // 3))
        self._keeper: asyncio.Task[None] | None = None
        self._held: dict[int, Held] = {}
        self._valid_until: dict[int, float] = {}
        """Per held partition: until when (local clock) the lease surely still is ours."""
        self._releasing: dict[int, int] = {}
        """Partitions given back: requests still in flight for them (released at 0)."""
        self._handed: dict[int, set[bytes]] = {p: set() for p in range(self.partitions)}
        """Per partition: entries handed to the engine and not acknowledged yet."""
        self._buffer: list[Record] = []
        self._full_read = False
        """The last read brought at least ``count`` records: a backlog, worth reading ahead."""
        """Records read but not handed out yet (at most one engine slice goes out at a time)."""
        self._revoke_again: set[int] = set()
        """Partitions whose changes must be revoked once more on the next ``read``: records the
        engine was still slicing when the first revoke came were taken in after it."""
        self._last_slice: set[int] = set()
        """Partitions of the records the last ``read`` returned: the engine may still be
        taking them in (it waits for room between slices)."""
        self._wake = asyncio.Event()
        self._ahead: asyncio.Task[None] | None = None
        """The next read, started when the last slice of a full read was handed out."""
        self._reading: set[int] = set()
        """Partitions named in the XREADGROUP in progress: not released before it returns."""
        self._next_check_at = 0.0
        self._ranges = ReplayRanges(self)
        """Per partition taken, its pending entries: a replay range over its IDs."""
        self._scanned: set[PartitionToken] = set()
        """Records of re-read pending entries in the buffer, not handed out yet."""
        self.live = 1
        self.lost = 0
        self.given_back = 0

    # -- leases ------------------------------------------------------------------------------

    def _lease_key(self, partition: int) -> str:
        return f"{self.address.partition_stream(partition)}:lease"

    @property
    def held(self) -> list[int]:
        """The partitions this consumer reads now."""
        return sorted(self._held)

    async def _keep_loop(self) -> None:
        interval = self.lease_ms / 3000
        failures = 0
        while True:
            await anyio.sleep(interval if not failures else min(interval, 0.2))
            client = self._client
            if client is None:
                return
            try:
                await self._keep(client)
                failures = 0
                self.outages.recovered("leases")
            except (RedisError, OSError) as exc:
                failures += 1
                if failures == 1:
                    self.reconnects += 1
                self.outages.failed("leases", str(exc) or type(exc).__name__)
                log.warning(
                    "redis unavailable for leases, retrying",
                    server=self.address.display,
                    attempt=failures,
                    error=str(exc) or type(exc).__name__,
                )
                with contextlib.suppress(RedisError, OSError):
                    await client.connection_pool.disconnect(inuse_connections=False)
            self._expire()

    def _expire(self) -> None:
        """Whatever happened, a lease not renewed in time is gone."""
        now = self._clock()
        for p in [p for p, until in self._valid_until.items() if now >= until]:
            self._lose(p, "lease expired before it could be renewed")

    async def _keep(self, client: Redis) -> None:
        """One round: heartbeat, renew, release what was given back, rebalance."""
        lease_ms = self.lease_ms
        self.live = int(
            await self._heartbeat_script(
                keys=[self.members_key], args=[self.consumer, lease_ms], client=client
            )
        )
        for p in sorted(set(self._held) | set(self._releasing)):
            started = self._clock()
            renewed = await self._renew_script(
                keys=[self._lease_key(p)], args=[self.consumer, lease_ms], client=client
            )
            if not renewed:
                if p in self._held:
                    self._lose(p, "lease lost (expired or taken over)")
                else:
                    self._releasing.pop(p, None)
                    self._valid_until.pop(p, None)
                continue
            self._valid_until[p] = started + lease_ms / 1000
        for p, outstanding in list(self._releasing.items()):
            if outstanding <= 0 and p not in self._revoke_again and p not in self._reading:
                await self._release_script(
                    keys=[self._lease_key(p)], args=[self.consumer], client=client
                )
                del self._releasing[p]
                self._valid_until.pop(p, None)
                self._handed[p].clear()
                log.info("partition given back", partition=p, consumer=self.consumer)
        share = -(-self.partitions // max(1, self.live))
        mine = len(self._held) + len(self._releasing)
        if len(self._held) > share:
            # Partitions being given back already count as gone.
            for p in sorted(self._held, reverse=True)[: len(self._held) - share]:
                self._give_back(p)
        elif mine < share:
            # Start at a place of our own so that replicas do not all race for partition 0.
            offset = zlib.crc32(self.consumer.encode()) % self.partitions
            for i in range(self.partitions):
                if mine >= share:
                    break
                p = (offset + i) % self.partitions
                if p in self._held or p in self._releasing:
                    continue
                started = self._clock()
                if await client.set(self._lease_key(p), self.consumer, nx=True, px=lease_ms):
                    self._held[p] = Held()
                    self._ranges.begin(self.streams[p], self._covers(p))
                    self._valid_until[p] = started + lease_ms / 1000
                    self._handed[p].clear()
                    mine += 1
                    log.info("partition taken", partition=p, consumer=self.consumer)
                    self._wake.set()

    def _covers(self, p: int) -> Callable[[str], bool]:
        """The contact IDs of partition p."""
        partitions = self.partitions
        return lambda key: partition_of(key, partitions) == p

    def _revoke(self, p: int) -> int:
        revoke = self.revoke
        if revoke is None:
            return 0
        return revoke(self._covers(p))

    def _stop_reading(self, p: int) -> int:
        """Stop reading p: drop its buffered records and revoke its waiting changes; the
        number of its changes still in flight."""
        self._held.pop(p, None)
        self._scanned = {token for token in self._scanned if token[0] != p}
        handed = self._handed[p]
        kept: list[Record] = []
        for record in self._buffer:
            token = cast(PartitionToken, record[0])
            if token[0] == p:
                handed.discard(token[1])
            else:
                kept.append(record)
        self._buffer = kept
        forgotten = self._revoke(p)
        self._ranges.end(self.streams[p])  # given up: its waiting changes were revoked
        if p in self._last_slice:
            self._revoke_again.add(p)
        return len(handed) - forgotten

    def _lose(self, p: int, why: str) -> None:
        """The lease is gone: stop at once; what is in flight may still finish."""
        if p in self._held:
            self._stop_reading(p)
            self.lost += 1
            log.warning(why, partition=p, consumer=self.consumer)
        self._releasing.pop(p, None)
        self._valid_until.pop(p, None)
        self._handed[p].clear()

    def _give_back(self, p: int) -> None:
        """Above the fair share: stop reading p, release it once its requests are done."""
        self._releasing[p] = self._stop_reading(p)
        self.given_back += 1
        log.info(
            "giving a partition back (fair share)",
            partition=p,
            consumer=self.consumer,
            live=self.live,
            in_flight=self._releasing[p],
        )
