"""The ``redis://`` source: one Redis stream read through a consumer group.

URI: ``redis://[USER:PASSWORD@]HOST:PORT/DB?stream=..&group=..&consumer=..&poll_s=..&batch=..
&claim_idle_s=..&delete_acked=..&partitions=..&lease_s=..`` (``rediss://`` for TLS; ``ssl_*``
parameters go to redis-py; the grammar is :mod:`worker.backends.uri`).

Each stream entry carries one change as JSON text in its field ``change`` (see
:mod:`worker.backends.redis.producer` for the wire format). Entries are read with ``XREADGROUP``
and acknowledged with ``XACK`` (and deleted, unless ``delete_acked=0``) only once the engine
has applied or durably dead-lettered them.

Order. The stream is one partition served by one live consumer at a time. Entries that an
earlier consumer left pending (it crashed, or was killed) are older than anything not yet
delivered, so they are handed out first: on start and after every reconnection the source

1. claims (``XAUTOCLAIM``) what other consumers left pending once it has been idle for
   ``claim_idle_s``, waiting up to that long for entries that are not idle enough yet,
2. re-reads its own pending entries in stream order (``XREADGROUP`` from ``0``), skipping those
   it already handed out in this run, and only then
3. reads new entries (``XREADGROUP >``), checking every ``claim_idle_s`` for entries left
   pending by another consumer (which only happens if two ran at once: their order relative to
   what was already handed out cannot be kept, and a warning says so).

The pending entries of steps 1 and 2 at the start may have been sent before a crash: they are a
replay range (DESIGN 9), read in full before any of them is sent; so are, in a partitioned
stream, the pending entries of a partition this replica takes.

Delivery is at least once: a connection error while running is retried with backoff, the
pending list (which Redis keeps) is re-read, and nothing is acknowledged that was not done.

Partitioned (``partitions=P``, P > 1; ``lease_s``, default 10): the streams
``<stream>:0`` .. ``<stream>:<P-1>`` (a change's partition is
:func:`worker.core.partition.partition_of` of its ID), each read by one replica at a time under
a lease key ``<stream>:<p>:lease``; see :class:`PartitionedRedisSource`. P = 1 is the single
stream above, unchanged.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from worker.backends.ahead import ReadAhead, ReadAheadAbandoned
from worker.backends.base import (
    Record,
    ReplayRanges,
    Source,
    SourceError,
    SourceStatistics,
)
from worker.backends.redis.client import (
    READ_LINGER_S,
    SMALL_READ,
    TRANSIENT_ERRORS,
    RedisClient,
    claim_all,
    ensure_group,
    is_nogroup,
    pending_elsewhere,
)
from worker.backends.redis.partitioned import PartitionedRedisSource
from worker.backends.redis.scripts import (
    DELETE_IDLE_CONSUMER,
    DELETED,
    START,
    Page,
    framed,
    stream_entries,
    unframed,
)
from worker.backends.redis.uri import (
    StreamAddress,
    parse_uri,
)
from worker.core.backoff import RECONNECT_BACKOFF
from worker.errors import ConfigError

log = structlog.get_logger("worker.backends.redis")

CLAIM_MARGIN_S = 0.1
"""Slack on top of ``claim_idle_ms`` so that entries idle since our start are surely claimable."""
MIN_CLAIM_INTERVAL_S = 0.1
AHEAD_RELEASE_WAIT_S = 5.0
"""How long close() waits for a read ahead still on its way, to release what it brought."""
RELEASED_IDLE_MS = 2**31 - 1
"""The idle time given to entries let go at close: claimable by the next consumer at once."""


class RedisStreamSource(RedisClient, Source):
    """Changes from a Redis stream through a consumer group; infinite (``read`` never ends)."""

    def __init__(
        self,
        address: StreamAddress,
        *,
        consumer: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._init_client(address, consumer, clock, rand)
        self.stream = address.stream
        self.block_ms = address.block_ms
        self.claim_idle_ms = address.claim_idle_ms
        self._claim_interval_s = max(MIN_CLAIM_INTERVAL_S, address.claim_idle_ms / 1000)
        self._poll_s = min(1.0, max(0.02, address.claim_idle_ms / 10_000))
        # Entries handed to the engine and not acked yet: a re-read of the pending list must
        # skip them, or an old change could overtake a newer one of the same contact.
        self._in_flight: set[bytes] = set()
        self._acked_while_scanning: set[bytes] = set()
        self._scan_from: bytes | None = None
        self._needs_recovery = True
        self._next_claim_at = 0.0
        self._ahead: ReadAhead[list[Record]] | None = None
        self._task_group: TaskGroup | None = None
        self._ranges = ReplayRanges(self)
        """The pending entries re-read at the start: one replay range, over every ID."""

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and create the consumer group if missing; fail with SourceError if unable."""
        self._client = await self._connect([self.stream], self.block_ms / 1000 + 10.0)
        self._ranges.begin(self.name)
        log.info(
            "redis source open",
            server=self.address.display,
            stream=self.stream,
            group=self.group,
            consumer=self.consumer,
        )

    def start(self, task_group: TaskGroup) -> None:
        """Reads ahead run in the engine's task group (none is started without one)."""
        self._task_group = task_group

    def _wrong_type(self, exc: ResponseError) -> str:
        return f"key {self.stream!r} exists and is not a stream"

    async def close(self) -> None:
        """Let go of a page read ahead and not handed out, unregister this consumer if it holds
        nothing, then disconnect."""
        client = self._client
        if client is None:
            return
        await self._release_ahead(client)
        self._client = None
        try:
            # Atomic, so that no entry is delivered to the consumer between check and delete
            # (DELCONSUMER drops its pending entries, which would then never be read again).
            await client.eval(DELETE_IDLE_CONSUMER, 1, self.stream, self.group, self.consumer)
        except (RedisError, OSError) as exc:
            log.info("consumer left registered", consumer=self.consumer, error=str(exc))
        finally:
            await client.aclose()
        self._log_closed(len(self._in_flight))

    async def _release_ahead(self, client: Redis) -> None:
        """A page read ahead and never handed out is pending at this consumer: mark it idle for
        long, so that the next consumer claims it at once instead of after claim_idle_ms."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or not await ahead.settle(AHEAD_RELEASE_WAIT_S):
            return
        if ahead.error is not None:
            return
        ids: list[Any] = [token for token, _ in ahead.result()]
        if not ids:
            return
        self._in_flight.difference_update(ids)
        try:
            await client.xclaim(
                self.stream, self.group, self.consumer, 0, ids, idle=RELEASED_IDLE_MS, justid=True
            )
        except (RedisError, OSError) as exc:
            log.info(
                "entries read ahead left pending: claimable after claim_idle_ms",
                count=len(ids),
                error=str(exc),
            )
            return
        log.info("entries read ahead released", count=len(ids), consumer=self.consumer)

    # -- reading -----------------------------------------------------------------------------

    async def read(self) -> Sequence[Record]:
        """The next entries in stream order, waiting for some; reconnects as long as it takes.

        After a full page, the next page is read ahead while the engine takes this one in (one
        round trip less to wait for in a backlog); it is handed out by the next call, or made
        claimable at once by :meth:`close` if none comes.
        """
        self._ranges.sync()
        records = await self._take_ahead()
        if not records:
            records = await self._read_next()
        self.backlog = len(records) >= self.count
        if (
            len(records) >= self.count
            and not self._needs_recovery
            and self._scan_from is None
            and self._clock() < self._next_claim_at
            and self._task_group is not None
        ):
            self._ahead = ReadAhead(
                self._task_group,
                self._read_ahead,
                limit_s=AHEAD_RELEASE_WAIT_S,
                shield=True,  # what it brings is pending here: close() must see it to release it
                name=f"{self.name} read ahead",
            )
        return records

    async def _read_ahead(self) -> list[Record]:
        """One read of new entries through the script (it never blocks)."""
        page = await self._read_page(self._require_client(), b">")
        return await self._records(page, skip_in_flight=False)

    async def _take_ahead(self) -> list[Record]:
        """The page read ahead, if any; nothing if it failed (the next read recovers: entries
        may have been delivered with the answer lost)."""
        ahead = self._ahead
        if ahead is None:
            return []
        try:
            # Still in _ahead while awaited: a reader stopped meanwhile leaves the page to
            # close(), which releases it.
            records = await ahead.wait()
        except (RedisError, OSError, ReadAheadAbandoned) as exc:
            self._ahead = None
            log.info("read ahead failed: reading again", error=str(exc))
            self._needs_recovery = True
            return []
        self._ahead = None
        if records:
            self.entries_read += len(records)
        return records

    async def _read_next(self) -> list[Record]:
        failures = 0
        if self._small_read:
            await anyio.sleep(READ_LINGER_S)
        while True:
            try:
                records = await self._read_step()
            except TRANSIENT_ERRORS as exc:
                failures += 1
                self._needs_recovery = True
                await self._back_off("read", failures, exc)
                continue
            except ResponseError as exc:
                if not is_nogroup(exc):
                    raise SourceError(self._explain(exc)) from exc
                log.warning(
                    "consumer group missing (deleted, or Redis restarted without persistence):"
                    " recreating it",
                    stream=self.stream,
                    group=self.group,
                )
                self._needs_recovery = True
                await anyio.sleep(RECONNECT_BACKOFF.base_s)
                continue
            self.outages.recovered("read")
            if failures:
                log.info("redis reachable again", server=self.address.display, failures=failures)
                failures = 0
            if records:
                self.entries_read += len(records)
                self._small_read = len(records) < SMALL_READ
                return records

    async def _read_step(self) -> list[Record]:
        """One round trip's worth of reading; may return nothing."""
        client = self._require_client()
        if self._needs_recovery:
            await self._recover(client)
            return []
        if self._scan_from is not None:
            return await self._scan_page(client)
        now = self._clock()
        if now >= self._next_claim_at:
            self._next_claim_at = now + self._claim_interval_s
            if await self._others_pending(client) and await self._claim(client):
                log.warning(
                    "claimed entries another consumer left pending while this one was running:"
                    " their order against entries already read is not guaranteed; run one"
                    " consumer per stream",
                    stream=self.stream,
                    consumer=self.consumer,
                )
                self._scan_from = START
            return []
        # A backlog is read through the script, whose reply is cheap to parse; only when there
        # is none does a plain XREADGROUP wait for the next entries.
        page = await self._read_page(client, b">")
        if not page:
            block_ms = max(1, min(self.block_ms, int((self._next_claim_at - now) * 1000)))
            reply = await client.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, count=self.count, block=block_ms
            )
            page = unframed(stream_entries(reply))
        return await self._records(page, skip_in_flight=False)

    async def _recover(self, client: Redis) -> None:
        """Take over what dead consumers left pending, then plan a re-read of our own."""
        if await ensure_group(client, self.stream, self.group):
            log.info("consumer group created", stream=self.stream, group=self.group)
        deadline = self._clock() + self.claim_idle_ms / 1000 + CLAIM_MARGIN_S
        announced = False
        while True:
            others = await self._others_pending(client)
            if others:
                await self._claim(client)
                others = await self._others_pending(client)
            if not others:
                break
            now = self._clock()
            if now >= deadline:
                log.warning(
                    "entries stay pending at other consumers (still running?): reading on;"
                    " per-contact order against them is not guaranteed",
                    consumers=others,
                )
                break
            if not announced:
                announced = True
                log.info(
                    "waiting for entries left pending by other consumers to become claimable",
                    consumers=others,
                    claim_idle_ms=self.claim_idle_ms,
                )
            await anyio.sleep(min(self._poll_s, deadline - now))
        self._scan_from = START
        self._acked_while_scanning.clear()
        self._next_claim_at = self._clock() + self._claim_interval_s
        self._needs_recovery = False

    async def _others_pending(self, client: Redis) -> dict[str, int]:
        """Pending counts of the group's other consumers (one cheap XPENDING summary)."""
        return await pending_elsewhere(client, self.stream, self.group, self.consumer)

    async def _claim(self, client: Redis) -> int:
        """XAUTOCLAIM every entry idle for claim_idle_ms; the number that were not ours."""
        ids = await claim_all(
            client, self.stream, self.group, self.consumer, self.claim_idle_ms, self.count
        )
        taken = sum(1 for entry_id in ids if entry_id not in self._in_flight)
        if taken:
            self.claimed += taken
            log.info("claimed pending entries", count=taken, consumer=self.consumer)
        return taken

    async def _scan_page(self, client: Redis) -> list[Record]:
        """The next page of our own pending list (in stream order) not handed out yet."""
        start = self._scan_from
        assert start is not None
        page = await self._read_page(client, start)
        if not page:
            self._scan_from = None
            self._acked_while_scanning.clear()
            # Every pending entry went out with earlier reads: the replay range was read.
            self._ranges.end(self.name)
            return []
        self._scan_from = page.last_id
        return await self._records(page, skip_in_flight=True)

    async def _read_page(self, client: Redis, start: bytes) -> Page:
        """XREADGROUP without blocking, through the script: new entries (``>``) or our own
        pending ones after ``start``."""
        reply = await self._read_script(
            keys=[self.stream], args=[self.group, self.consumer, self.count, start], client=client
        )
        return framed(reply)

    async def _records(self, page: Page, *, skip_in_flight: bool) -> list[Record]:
        in_flight = self._in_flight
        if page.plain and not skip_in_flight:
            # The usual page: new entries, each with its change. In bulk, no branches.
            in_flight.update(page.ids)
            return list(zip(page.ids, page.values, strict=True))  # type: ignore[arg-type]
        acked = self._acked_while_scanning
        records: list[Record] = []
        append = records.append
        vanished: list[bytes] = []
        for entry_id, value in zip(page.ids, page.values, strict=True):
            if skip_in_flight and (entry_id in in_flight or entry_id in acked):
                continue
            if type(value) is int:
                if value == DELETED:  # XDEL or trimming while pending: nothing left to do
                    vanished.append(entry_id)
                    continue
                # b"" fails decoding, so the engine dead-letters the entry `invalid` and acks it.
                log.warning("entry without a change field", entry=entry_id.decode())
                value = b""
            in_flight.add(entry_id)
            append((entry_id, value))  # type: ignore[arg-type]
        if vanished:
            log.warning(
                "pending entries were deleted from the stream before being processed",
                count=len(vanished),
                first=vanished[0].decode(),
            )
            await self._xack(self._require_client(), vanished)
        return records

    # -- acknowledging -----------------------------------------------------------------------

    async def ack(self, tokens: Sequence[Hashable]) -> None:
        """XACK (and XDEL) these entries in one round trip, retrying until Redis takes it (the
        engine acknowledges everything settled since its last call at once)."""
        ids: list[bytes] = list(tokens)  # type: ignore[arg-type]
        if not ids:
            return
        # A group gone took its pending list with it: nothing left to ack.
        await self._acked([self.stream], self._ack_args(ids))
        if self._scan_from is not None:
            self._acked_while_scanning.update(ids)
        self._in_flight.difference_update(ids)
        self.acked += len(ids)

    async def _xack(self, client: Redis, ids: list[bytes]) -> None:
        await self._ack_script(keys=[self.stream], args=self._ack_args(ids), client=client)

    def _ack_args(self, ids: list[bytes]) -> list[bytes | str | int]:
        # One argument, not one per ID: encoding thousands of arguments costs more CPU in
        # redis-py than the rest of the acknowledgement.
        return [self.group, int(self.address.delete_acked), b" ".join(ids)]

    # -- helpers -----------------------------------------------------------------------------

    def describe(self, tokens: Sequence[Hashable]) -> str:
        """``redis:STREAM/ENTRY-ID``, several entry IDs joined by commas."""
        return f"{self.name}/" + ",".join(
            t.decode() if isinstance(t, bytes) else str(t) for t in tokens
        )

    def pending_in_run(self) -> int:
        """Entries handed out and not acknowledged yet."""
        return len(self._in_flight)

    def statistics(self) -> SourceStatistics:
        """Reachable or not (and why), reconnects, entries handed out and not acked."""
        problem = self.outages.problem
        return SourceStatistics(
            available=not problem,
            problem=f"redis {self.address.display}: {problem}" if problem else "",
            reconnects=self.reconnects,
            unacked=len(self._in_flight),
        )


def from_uri(
    uri: str,
    *,
    consumer: str | None = None,
    claim_idle_ms: int | None = None,
    block_ms: int | None = None,
    count: int | None = None,
) -> RedisStreamSource | PartitionedRedisSource:
    """The source a ``redis://`` URI names (not opened yet); ConfigError if the URI is bad.

    Keyword arguments, when given, win over the URI's parameters of the same name. With
    ``partitions`` above 1 it is a :class:`PartitionedRedisSource`.
    """
    address = parse_uri(uri)
    for name, value, minimum in (
        ("claim_idle_ms", claim_idle_ms, 0),
        ("block_ms", block_ms, 1),
        ("count", count, 1),
    ):
        if value is not None and value < minimum:
            raise ConfigError(f"redis source: {name} must be at least {minimum}, got {value}")
    address = dataclasses.replace(
        address,
        claim_idle_ms=address.claim_idle_ms if claim_idle_ms is None else claim_idle_ms,
        block_ms=address.block_ms if block_ms is None else block_ms,
        count=address.count if count is None else count,
    )
    if address.partitions > 1:
        return PartitionedRedisSource(address, consumer=consumer)
    return RedisStreamSource(address, consumer=consumer)
