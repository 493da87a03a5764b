"""The partition leases of a partitioned Redis input: the primitives (take, renew, release,
count live members) carrying out what :class:`worker.core.ownership.Ownership` decides."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import anyio
import structlog
from anyio.abc import TaskGroup
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from worker.backends.ahead import ReadAhead
from worker.backends.base import (
    Held as HeldRecords,
)
from worker.backends.base import (
    Record,
    ReplayRanges,
    Source,
    SourceError,
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
from worker.core.ownership import Ownership
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
        self._held: dict[int, Held] = {}
        self._own = Ownership(self.partitions, self.consumer)
        """Which partitions to take, give back, release; until when each lease is ours."""
        self._releasing: dict[int, int] = {}
        """Partitions given back: requests still in flight for them (released at 0)."""
        self._handed: dict[int, set[bytes]] = {p: set() for p in range(self.partitions)}
        """Per partition: entries handed to the engine and not acknowledged yet."""
        self._buffer: list[Record] = []
        """Records read but not handed out yet (a read ahead)."""
        self._full_read = False
        """The last read brought at least ``count`` records: a backlog, worth reading ahead."""
        self._wake = asyncio.Event()
        self._ahead: ReadAhead[None] | None = None
        """The next read, started in the engine's task group when a full read was handed out."""
        self._task_group: TaskGroup | None = None
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
        """Keep the leases until the source closes, in the engine's task group: a failure
        that is not an outage ends the run (every lease is let go first)."""
        try:
            await self._keep_rounds()
        except Exception as exc:
            for p in list(self._held):
                self._lose(p, "lease keeper stopped")
            raise SourceError(f"{self.name}: the lease keeper stopped: {exc!r}") from exc

    async def _keep_rounds(self) -> None:
        interval = self.lease_ms / 3000
        failures = 0
        # The first round at once: the run starts after the start-up check, which may have
        # taken longer than a lease since open() took them.
        first = True
        while True:
            if not first:
                await anyio.sleep(interval if not failures else min(interval, 0.2))
            first = False
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
        for lost in self._own.expire(self._clock()):
            self._lose(lost.partition, "lease expired before it could be renewed")

    def _in_flight(self) -> dict[int, int]:
        """Per partition held, what may still be in a request: for one given back, its entries
        handed out and neither acknowledged, forgotten nor dropped by the engine (read under
        the holding, taken in after it ended); for one still read, every entry handed out. A
        read under way counts as one more."""
        counts = {p: len(self._handed[p]) for p in self._held}
        counts.update(self._releasing)
        busy = self._reading
        return {p: n + (p in busy) for p, n in counts.items()}

    async def _keep(self, client: Redis) -> None:
        """One round: heartbeat, then what the ownership plans: give back above the fair
        share, renew, release what was given back and is idle, take free partitions."""
        lease_ms = self.lease_ms
        lease_s = lease_ms / 1000
        self.live = int(
            await self._heartbeat_script(
                keys=[self.members_key], args=[self.consumer, lease_ms], client=client
            )
        )
        plan = self._own.plan(self.live, self._in_flight())
        for p in plan.given_back:
            self._give_back(p)
        for p in plan.renew:
            started = self._clock()
            renewed = await self._renew_script(
                keys=[self._lease_key(p)], args=[self.consumer, lease_ms], client=client
            )
            if renewed:
                self._own.renewed(p, started, lease_s)
            else:
                self._lose(p, "lease lost (expired or taken over)")
        held = self._own.held()
        for p in plan.release:
            if p not in held:
                continue  # lost while renewing
            await self._release_script(
                keys=[self._lease_key(p)], args=[self.consumer], client=client
            )
            self._own.released(p)
            del self._releasing[p]
            self._handed[p].clear()
            log.info("partition given back", partition=p, consumer=self.consumer)
        want = plan.want
        for p in plan.take:
            if want <= 0:
                break
            started = self._clock()
            if await client.set(self._lease_key(p), self.consumer, nx=True, px=lease_ms):
                self._own.taken(p, started, lease_s)
                self._held[p] = Held()
                self._ranges.begin(self.streams[p], self._covers(p))
                self._handed[p].clear()
                want -= 1
                log.info("partition taken", partition=p, consumer=self.consumer)
                if self.assignments is not None:
                    self.assignments.assigned([p])
                self._wake.set()

    def _covers(self, p: int) -> Callable[[str], bool]:
        """The contact IDs of partition p."""
        partitions = self.partitions
        return lambda key: partition_of(key, partitions) == p

    def _revoke(self, p: int) -> int:
        listener = self.assignments
        if listener is None:
            return 0
        return listener.revoked([p], self._covers(p))

    def current(self, partition: int, generation: int) -> bool:
        """Whether the holding records were read under is still read."""
        return self._own.current(partition, generation)

    def dropped(self, held: HeldRecords) -> None:
        """Records the engine dropped (their holding ended): not in flight any more."""
        p = held.partition
        if self._own.held_generation(p) != held.generation:
            return  # lost (its entries forgotten with it), or held again: not counted there
        handed = self._handed[p]
        for token, _ in held.records:
            handed.discard(cast(PartitionToken, token)[1])
        if p in self._releasing:
            self._releasing[p] -= len(held.records)

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
        return len(handed) - forgotten

    def _lose(self, p: int, why: str) -> None:
        """The lease is gone: stop at once; what is in flight may still finish."""
        self._own.lose(p, why)
        if p in self._held:
            self._stop_reading(p)
            self.lost += 1
            log.warning(why, partition=p, consumer=self.consumer)
        self._releasing.pop(p, None)
        self._handed[p].clear()

    def _give_back(self, p: int) -> None:
        """Above the fair share (the ownership already stopped reading p): stop reading it
        here, release it once its requests are done."""
        self._releasing[p] = self._stop_reading(p)
        self.given_back += 1
        log.info(
            "giving a partition back (fair share)",
            partition=p,
            consumer=self.consumer,
            live=self.live,
            in_flight=self._releasing[p],
        )
