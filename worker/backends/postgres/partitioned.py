"""The partitions of a partitioned outbox (``partitions`` above 1): advisory locks held by a
lock connection, taken, given back and unlocked as :class:`worker.core.ownership.Ownership`
decides, lost with the connection."""

from __future__ import annotations

import math
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import anyio
import asyncpg
import structlog

from worker.backends.base import (
    Held,
    HeldRecords,
    Outages,
    Record,
    ReplayRanges,
    Source,
    SourceError,
)
from worker.backends.postgres.pool import (
    COMMAND_TIMEOUT_S,
    CONNECT_TIMEOUT_S,
    DATABASE_ERRORS,
    TRANSIENT_ERRORS,
    describe_error,
    drop,
    gone,
    in_transaction,
    retrying,
)
from worker.backends.postgres.rate import TABLE as RATE_TABLE
from worker.backends.postgres.rate import PgRate
from worker.backends.postgres.sql import (
    Statements,
)
from worker.backends.postgres.uri import (
    OutboxUri,
)
from worker.core.backoff import RECONNECT_BACKOFF, Backoff
from worker.core.ownership import Ownership
from worker.core.partition import partition_of

log = structlog.get_logger("worker.backends.postgres")


@dataclass(slots=True)
class OutboxStats:
    """The source's counters (the natural feed for metrics)."""

    claims: int = 0
    rows_claimed: int = 0
    rows_acked: int = 0
    rows_renewed: int = 0
    rows_lost: int = 0
    """Rows whose lease ran out and another worker took before we renewed it."""
    retries: int = 0
    wakeups: int = 0
    """Notifications received."""
    listens: int = 0
    """Connections made for LISTEN (more than one: the listener was lost and reconnected)."""
    partitions_taken: int = 0
    partitions_given_back: int = 0
    partitions_lost: int = 0
    """Partitions revoked because the lock connection was lost."""
    lock_connections: int = 0


class PartitionClaims(Source):
    """The state of an outbox source, its claims, and its partitions (``partitions`` above 1):
    the rest, reading and acknowledging, is :class:`~.outbox.PgOutboxSource`'s."""

    def __init__(
        self,
        target: OutboxUri,
        *,
        backoff: Backoff = RECONNECT_BACKOFF,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self.label = target.outbox
        self.name = f"postgresql:{self.label}"
        self.batch = target.batch
        self.lease_s = target.lease_s
        self.poll_s = target.poll_s
        self.stats = OutboxStats()
        self.outages = Outages()
        """The operations failing now (for ``statistics``)."""
        self.worker_id = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:12]}"
        self._mine = self.worker_id + ":"
        self._backoff = backoff
        self._clock = clock
        self._pool: Any = None
        self._listener: Any = None
        self._channel = ""
        self._lock_sql = ""
        self._wake = anyio.Event()
        self._cursor = 0
        """Claims go on after this id; 0 rescans the whole table."""
        self._last_sweep = -math.inf
        self._claim_no = 0
        self._pending: dict[int, float] = {}
        """Rows handed out and not acknowledged: id -> when its lease runs out (our clock)."""
        self._failure: BaseException | None = None
        self._sql = Statements(target.outbox)
        self.partitions = target.partitions
        self.rebalance_s = target.rebalance_s
        self._held: set[int] = set()
        """Partitions this replica claims rows of (their locks are held)."""
        self._own = Ownership(self.partitions, self.worker_id)
        """Which partitions to take, give back and unlock."""
        self._draining: dict[int, int] = {}
        """Partitions given back, still locked until their requests in flight end:
        partition -> (rows forgotten by the engine, when to unlock anyway)."""
        self._part: dict[int, int] = {}
        """Rows handed out (partitioned): id -> partition."""
        self._filed: dict[int, str] = {}
        """Rows handed out whose contact_id is not the text of their change's ID (until the
        engine checked them, or they are acknowledged): id -> contact_id."""
        self._locks: Any = None
        """The lock connection: its session holds the member and partition locks."""
        self._lock_pid = 0
        self._oid = 0
        self._rebalance_wake = anyio.Event()
        self._gains = 0
        """Partitions taken so far: a claim that overlapped a take must not move the cursor
        past the new partition's older rows."""
        self._ranges = ReplayRanges(self)
        self._replay_to = 0
        """The highest id of the rows claimed by others at the start (unpartitioned)."""
        self._replay_parts: dict[int, tuple[int, int]] = {}
        """Partitions whose replay range is being claimed: p -> (its highest id claimed by
        others when taken, the count of takes then)."""

    async def _claimed_rows(
        self, recover: str, claim: Callable[[Any, str], Awaitable[list[Any]]]
    ) -> tuple[list[Any], str, float]:
        """One claim (``claim(connection, token)``) in a short transaction, retried: its rows in
        id order, its token, and when it started."""
        self._claim_no += 1
        token = f"{self._mine}{self._claim_no}"
        tried = False

        async def attempt(conn: Any) -> list[Any]:
            nonlocal tried
            if tried:
                # The last attempt may have committed before its answer was lost: take those
                # rows first, or they would be skipped (as ours) and sent out of order.
                rows = await conn.fetch(recover, token, self.lease_s)
                if rows:
                    return rows  # type: ignore[no-any-return]
            tried = True
            return await in_transaction(conn, self._lock_sql, lambda: claim(conn, token))

        started = self._clock()
        rows = await retrying(
            "claim",
            self.name,
            self._pool,
            attempt,
            backoff=self._backoff,
            on_retry=self._count_retry,
            outages=self.outages,
        )
        self.stats.claims += 1
        rows.sort(key=_first)
        return rows, token, started

    def shared_rate(self) -> PgRate:
        """The account's rate, booked from one row of ``contact_worker_rate`` (next to the
        outbox) by every replica of this input."""
        return PgRate(lambda: self._pool, self.target.outbox, self.target.qualify(RATE_TABLE))

    def _count_retry(self) -> None:
        self.stats.retries += 1

    def _replay_partitions(self, gains: int, rows: int, last_id: int, handed: bool) -> None:
        """After a partitioned claim that started with ``gains`` takes done: a partition taken
        before it has its replay range claimed once the claims (up from 0 since the take, in id
        order, none skipped) reach its end, or a claim comes back short (nothing left)."""
        for p, (end, taken_at) in list(self._replay_parts.items()):
            if gains < taken_at or (last_id < end and rows >= self.batch):
                continue
            del self._replay_parts[p]
            name = self._range_name(p)
            if handed:
                self._ranges.end_after_read(name)
            else:
                self._ranges.end(name)

    def _range_name(self, p: int) -> str:
        return f"{self.name}:{p}"

    # -- partitions (partitions > 1) ---------------------------------------------------------

    def _covers(self, p: int) -> Callable[[str], bool]:
        """The contact IDs of partition p."""
        count = self.partitions
        return lambda key: partition_of(key, count) == p

    @property
    def held(self) -> frozenset[int]:
        """The partitions this replica claims rows of now."""
        return frozenset(self._held)

    @property
    def lock_pid(self) -> int:
        """The server process of the lock connection (0: none)."""
        return self._lock_pid

    async def _claim_partitions(self, after: int) -> HeldRecords:
        """Claim the lowest-id rows of the held partitions, leases of others ignored: holding a
        partition's lock means its previous holder is gone (or gave it back when idle). The
        rows, grouped by the holding they were claimed under."""
        held = sorted(self._held)
        if not held or self._locks is None:
            return HeldRecords()
        sql = self._sql
        pid = self._lock_pid
        oid = self._oid
        gains = self._gains
        rows, token, started = await self._claimed_rows(
            sql.recover_p,
            lambda conn, token: conn.fetch(
                sql.claim_p, after, self._mine, self.batch, token, self.lease_s, held, pid, oid
            ),
        )
        self.backlog = len(rows) >= self.batch
        if not rows:
            if self._replay_parts:
                self._replay_partitions(gains, 0, 0, handed=False)
            return HeldRecords()
        deadline = started + self.lease_s
        pending = self._pending
        part = self._part
        still = self._held  # a partition may have gone while the claim ran
        groups: dict[int, list[Record]] = {}
        stale: list[int] = []
        for row_id, p, text, filed in rows:
            if p not in still:
                stale.append(row_id)
                continue
            pending[row_id] = deadline
            part[row_id] = p
            if filed is not None:
                self._filed[row_id] = filed
            group = groups.get(p)
            if group is None:
                groups[p] = group = []
            group.append((row_id, text.encode()))
        records = HeldRecords(
            Held(p, self._own.generation(p) or 0, group) for p, group in groups.items()
        )
        if stale:
            release = sql.release_ids
            await retrying(
                "release",
                self.name,
                self._pool,
                lambda conn: conn.execute(release, stale, token),
                backoff=self._backoff,
                on_retry=self._count_retry,
                outages=self.outages,
            )
        if gains == self._gains:
            self._cursor = rows[-1][0]
        if self._replay_parts:
            self._replay_partitions(gains, len(rows), rows[-1][0], handed=bool(records))
        self.stats.rows_claimed += len(rows) - len(stale)
        return records

    def current(self, partition: int, generation: int) -> bool:
        """Whether the holding rows were claimed under is still claimed from."""
        return self._own.current(partition, generation)

    def dropped(self, held: Held) -> None:
        """Rows the engine dropped (their holding ended): not in flight any more."""
        if self._own.held_generation(held.partition) != held.generation:
            return  # lost (its rows forgotten with it), or held again: not counted there
        for row_id, _ in held.records:
            self._part.pop(cast(int, row_id), None)
            self._pending.pop(cast(int, row_id), None)
            self._filed.pop(cast(int, row_id), None)

    def _forget(self, partitions: set[int]) -> int:
        """Have the engine forget the waiting changes of these partitions; how many."""
        for p in partitions:  # given up: their replay ranges too
            self._replay_parts.pop(p, None)
            self._ranges.end(self._range_name(p))
        listener = self.assignments
        if listener is None or not partitions:
            return 0
        count = self.partitions
        return listener.revoked(partitions, lambda key: partition_of(key, count) in partitions)

    def _lose_all(self, reason: str) -> None:
        """The lock connection is gone, and its locks with it: stop claiming every partition
        at once and forget their waiting changes (requests in flight still finish)."""
        lost = self._held | set(self._draining)
        self._own.lose_all(reason)
        conn, self._locks, self._lock_pid = self._locks, None, 0
        if conn is not None:
            conn.remove_termination_listener(self._locks_closed)
            drop(conn)
        if not lost:
            return
        self._held.clear()
        self._draining.clear()
        forgotten = self._forget(lost)
        for row_id, p in list(self._part.items()):
            if p in lost:
                del self._part[row_id]
                self._pending.pop(row_id, None)  # the next holder takes the rows over
        self.stats.partitions_lost += len(lost)
        log.warning(
            "partitions lost",
            source=self.name,
            partitions=sorted(lost),
            reason=reason,
            forgotten=forgotten,
        )

    def _locks_closed(self, conn: object = None, *_args: object) -> None:
        if conn is not None and conn is not self._locks:
            return  # an older lock connection, already given up
        self._lose_all("lock connection closed")
        self._rebalance_wake.set()

    async def _connect_locks(self) -> Any:
        conn = await asyncpg.connect(
            self.target.dsn,
            timeout=CONNECT_TIMEOUT_S,
            command_timeout=COMMAND_TIMEOUT_S,
            server_settings=self.target.server_settings,
        )
        try:
            await conn.execute(self._sql.join)
            pid = int(conn.get_server_pid())
        except BaseException:
            drop(conn)
            raise
        conn.add_termination_listener(self._locks_closed)
        self._locks, self._lock_pid = conn, pid
        self.stats.lock_connections += 1
        return conn

    async def _close_locks(self) -> None:
        conn, self._locks, self._lock_pid = self._locks, None, 0
        if conn is None:
            return
        conn.remove_termination_listener(self._locks_closed)
        try:
            with anyio.fail_after(2):
                await conn.close()
        except (*TRANSIENT_ERRORS, asyncpg.InterfaceError):
            drop(conn)

    def _in_flight(self) -> dict[int, int]:
        """Per partition held, its rows that may still be in a request: those handed out and
        not acknowledged, less (given back) those the engine forgot."""
        counts = dict.fromkeys(self._held | set(self._draining), 0)
        for p in self._part.values():
            if p in counts:
                counts[p] += 1
        for p, forgotten in self._draining.items():
            counts[p] -= forgotten
        return counts

    async def rebalance(self) -> None:
        """One tick: (re)connect the lock connection, count the live replicas, and carry out
        what the ownership plans: give back partitions above the fair share, unlock those
        given back once none of their rows is in a request, take free ones."""
        conn = self._locks
        if conn is None or gone(conn):
            self._lose_all("lock connection lost")
            conn = await self._connect_locks()
        sql = self._sql
        try:
            live = int(await conn.fetchval(sql.members, self._oid))
            plan = self._own.plan(live, self._in_flight())
            if plan.given_back:
                self._held.difference_update(plan.given_back)
                for p in plan.given_back:  # one by one: the engine counts the rows it forgot
                    self._draining[p] = self._forget({p})
                self._rebalance_wake.set()  # unlock as soon as the next tick allows
            for p in plan.release:
                for row_id in [row_id for row_id, part in self._part.items() if part == p]:
                    del self._part[row_id]
                    self._pending.pop(row_id, None)
                await conn.execute(sql.unlock, p)
                self._own.released(p)
                del self._draining[p]
                self.stats.partitions_given_back += 1
                log.info("partition given back", source=self.name, partition=p, live=live)
            want = plan.want
            if want > 0:
                free = {p for (p,) in await conn.fetch(sql.free, self._oid, self.partitions)}
                for p in plan.take:
                    if want <= 0:
                        break
                    if p not in free or not await conn.fetchval(sql.try_lock, p):
                        continue
                    # Rows claimed before (by a replica that died, or by this one in an
                    # earlier turn) may have been sent: up to the last of them, a replay range.
                    end = int(await conn.fetchval(sql.replay_end_p, p))
                    # Rows this replica claimed in an earlier turn of the partition (then
                    # forgotten) would be skipped as its own: free them first.
                    await conn.execute(sql.release_partition, p, self._mine)
                    self._own.taken(p, self._clock())
                    self._held.add(p)
                    if self.assignments is not None:
                        self.assignments.assigned([p])
                    want -= 1
                    self.stats.partitions_taken += 1
                    self._cursor = 0
                    self._gains += 1
                    if end:
                        self._replay_parts[p] = (end, self._gains)
                        self._ranges.begin(self._range_name(p), self._covers(p))
                    self._wake.set()
                    log.info("partition taken", source=self.name, partition=p, live=live)
        except (*TRANSIENT_ERRORS, asyncpg.InterfaceError):
            if conn is self._locks:
                self._lose_all("lock connection failed")
            raise

    async def _keep_partitions(self) -> None:
        """Rebalance every ``rebalance_s``; a lost lock connection revokes every partition."""
        attempt = 0
        try:
            while True:
                wait = self.rebalance_s
                try:
                    await self.rebalance()
                    attempt = 0
                    self.outages.recovered("partitions")
                except (*DATABASE_ERRORS, asyncpg.InterfaceError) as exc:
                    self.outages.failed("partitions", describe_error(exc))
                    self._lose_all(f"lock connection failed: {describe_error(exc)}")
                    attempt += 1
                    wait = min(wait, self._backoff.delay(attempt, random.random()))
                    log.warning(
                        "postgresql unavailable: partitions retry",
                        source=self.name,
                        error=describe_error(exc),
                        attempt=attempt,
                        retry_in_s=round(wait, 3),
                    )
                if self._draining:
                    wait = min(wait, 0.1)
                with anyio.move_on_after(wait):
                    await self._rebalance_wake.wait()
                self._rebalance_wake = anyio.Event()
        except Exception as exc:  # ends the run (and the next read or ack fails too)
            log.error("keeping partitions failed", source=self.name, error=describe_error(exc))
            self._lose_all("keeping partitions failed")
            self._failure = exc
            raise SourceError(
                f"{self.name}: keeping partitions failed: {describe_error(exc)}"
            ) from exc


def _first(row: Any) -> Any:
    return row[0]
