"""The ``postgresql://`` source: a transactional-outbox table, claimed in ``id`` order with a lease.

Upstream systems insert one row per change into the outbox table in the same transaction as their
own write (the wire format is in :mod:`.producer`). The worker claims rows in
short transactions and never holds one open across an HTTP call:

- **claim**: in one short transaction, under a transaction-scoped advisory lock on the table (so
  two claimers never interleave), the lowest-``id`` rows that are not this worker's are stamped
  ``claimed_by = '<worker>:<claim number>'`` and ``claimed_until = now() + lease``. The claim stops
  before the first row whose lease another worker still holds: a worker never overtakes rows that
  someone else may still be sending, so per-contact order (``id`` order) holds when a worker dies
  holding rows; they come back once their lease expires, before anything newer.
- **ack**: ``DELETE ... WHERE id = ANY($1)``, one statement per ack call.
- **lease**: a background task renews the leases of rows still in flight before they run out.
  On close, the rows not acknowledged are released at once for the next worker.
- **wake-up**: ``LISTEN`` on the channel ``<schema>.<table>``, notified by the DDL's trigger, with
  a fallback poll every ``poll_s`` seconds. Claims go on from the highest ``id`` claimed so far;
  the fallback poll rescans from the start of the table, which picks up a row whose transaction
  committed after a higher ``id`` was already claimed.
- **outages**: a lost connection is retried with capped exponential backoff, without limit; the
  claims are in the table, so a database restart loses nothing (and reorders nothing).
- **replay** (DESIGN 9): rows claimed at the start (by a worker that died: it may have sent them)
  are a replay range, up to the highest such ``id``: everything up to there is claimed and
  coalesced before any of it is sent. With partitions, the same holds per partition taken.

**Partitions** (``partitions=P``, P > 1): producers set ``partition = partition_of(contact_id,
P)`` (CRC-32 of the UTF-8 ID, modulo P). A replica serves partition p while the session of its
*lock connection* (one per replica, nothing else runs on it) holds the advisory lock
``(<table oid>, PARTITION_TAG + p)``; every replica also holds ``(<table oid>, MEMBER_KEY)`` in
shared mode, so the holders of that lock are the live replicas. Every ``rebalance_s`` a replica
takes free partitions up to ``ceil(P / live)`` and gives back the ones above it: a partition
given back is no longer claimed, its waiting changes are revoked (the engine forgets them,
unacknowledged), and it is unlocked once its rows in flight are acknowledged. A process that
dies loses its session and so its locks; the next holder takes its claimed rows over at once
(holding the lock proves the previous holder gone). A lost lock connection revokes every
partition at once. Claims only touch rows of held partitions, checked against ``pg_locks`` in
the claim itself, in ``id`` order; leases of other replicas are ignored there.

The URI is the asyncpg DSN plus the worker's own query parameters, stripped before connecting:
``postgresql://user@host:5432/db?table=contact_changes&schema=public&batch=1000&lease_s=60&poll_s=5``
(and ``partitions=1&rebalance_s=2``).
Every other query parameter goes to asyncpg (``sslmode``, ``application_name``, server settings).

asyncpg ties this module to the asyncio backend of anyio.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Sequence
from typing import Any, cast

import anyio
import asyncpg
import structlog
from anyio.abc import TaskGroup

from worker.backends.base import (
    HeldRecords,
    Record,
    SourceError,
    SourceStatistics,
)
from worker.backends.postgres.partitioned import (
    PartitionClaims,
)
from worker.backends.postgres.pool import (
    CONNECT_TIMEOUT_S,
    DATABASE_ERRORS,
    OPEN_ERRORS,
    TRANSIENT_ERRORS,
    CannotOpen,
    close_pool,
    describe_error,
    pool_for_table,
    retrying,
)
from worker.backends.postgres.uri import (
    ADVISORY_CLASS,
    OUTBOX_COLUMNS,
    PARTITIONED_COLUMNS,
    parse_uri,
)
from worker.core.change import key_mismatch
from worker.core.partition import partition_mismatch

log = structlog.get_logger("worker.backends.postgres")


class PgOutboxSource(PartitionClaims):
    """Rows of an outbox table, in ``id`` order; an infinite source (``read`` never ends)."""

    files_by_key = True  # contact_id (and partition) beside the change

    @classmethod
    def from_uri(cls, uri: str) -> PgOutboxSource:
        """The source a ``postgresql://`` URI names (not opened yet)."""
        return cls(parse_uri(uri))

    # -- opening and closing -----------------------------------------------------------------

    async def open(self) -> None:
        """Connect, check the table, listen for inserts, start keeping leases."""
        target = self.target
        columns = PARTITIONED_COLUMNS if self.partitions > 1 else OUTBOX_COLUMNS
        try:
            self._pool, oid, schema = await pool_for_table(
                target, self.name, target.table, columns, max_size=4
            )
        except CannotOpen as exc:
            raise SourceError(str(exc)) from exc
        self._channel = f"{schema}.{target.table}"
        if self.partitions == 1:
            try:
                self._replay_to = int(await self._pool.fetchval(self._sql.replay_end))
            except OPEN_ERRORS as exc:
                await self._close_pool()
                raise SourceError(
                    f"cannot open {self.name} at {target.display}: {describe_error(exc)}"
                ) from exc
            if self._replay_to:
                self._ranges.begin(self.name)
        lock_key = oid - (1 << 32) if oid >= 1 << 31 else oid  # the lock takes an int4
        self._lock_sql = f"SELECT pg_advisory_xact_lock({ADVISORY_CLASS}, {lock_key})"
        self._oid = oid
        await self._listen()
        if self.partitions > 1:
            self._sql.partitioned(target.outbox, lock_key)
            with contextlib.suppress(*DATABASE_ERRORS, asyncpg.InterfaceError):
                await self.rebalance()  # take a share now; the rebalancer retries otherwise

    def start(self, task_group: TaskGroup) -> None:
        """Start keeping leases (and partitions) in the engine's task group."""
        task_group.start_soon(self._keep_leases, name=f"{self.name} leases")
        if self.partitions > 1:
            task_group.start_soon(self._keep_partitions, name=f"{self.name} partitions")

    async def close(self) -> None:
        """Release the rows not acknowledged (for the next worker, at once) and disconnect
        (the keepers stopped with the engine's task group)."""
        if self._pool is not None and self._claim_no:
            try:
                with anyio.fail_after(5):
                    status = await self._pool.execute(self._sql.release, self._mine)
                released = int(status.rpartition(" ")[2])  # "UPDATE <rows>"
                if released:
                    log.info("released unacknowledged rows", source=self.name, rows=released)
            except DATABASE_ERRORS as exc:
                log.warning(
                    "could not release rows: they come back when their lease runs out",
                    source=self.name,
                    error=describe_error(exc),
                )
        self._pending.clear()
        self._part.clear()
        self._filed.clear()
        self._held.clear()
        self._draining.clear()
        self._own.lose_all("closed")
        await self._close_locks()  # after the release: the next owner finds the rows free
        await self._unlisten()
        await self._close_pool()

    async def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        await close_pool(pool)

    # -- listening ---------------------------------------------------------------------------

    def _notified(self, *_args: object) -> None:
        self.stats.wakeups += 1
        self._wake.set()

    def _listener_lost(self, *_args: object) -> None:
        self._wake.set()  # so read() reconnects the listener now, not at the next poll

    async def _listen(self) -> bool:
        """(Re)connect the LISTEN connection; False if the database is not reachable now."""
        await self._unlisten()
        try:
            conn = await asyncpg.connect(
                self.target.dsn,
                timeout=CONNECT_TIMEOUT_S,
                server_settings=self.target.server_settings,
            )
        except OPEN_ERRORS as exc:
            log.warning("cannot listen: polling", source=self.name, error=describe_error(exc))
            return False
        try:
            await conn.add_listener(self._channel, self._notified)
        except DATABASE_ERRORS as exc:
            conn.terminate()
            log.warning("cannot listen: polling", source=self.name, error=describe_error(exc))
            return False
        conn.add_termination_listener(self._listener_lost)
        self._listener = conn
        self.stats.listens += 1
        return True

    async def _unlisten(self) -> None:
        if self._listener is not None:
            conn, self._listener = self._listener, None
            conn.remove_termination_listener(self._listener_lost)
            try:
                with anyio.fail_after(2):
                    await conn.close()
            except TRANSIENT_ERRORS:
                conn.terminate()

    # -- reading -----------------------------------------------------------------------------

    async def read(self) -> Sequence[Record] | HeldRecords | None:
        """The next rows in ``id`` order, waiting for some; never None (the table is endless)."""
        while True:
            self._raise_failure()
            self._wake = anyio.Event()  # before claiming: an insert from now on wakes us
            now = self._clock()
            sweep = now - self._last_sweep >= self.poll_s
            if sweep:
                self._last_sweep = now
            self._ranges.sync()
            if self.partitions > 1:
                held = await self._claim_partitions(0 if sweep else self._cursor)
                if held:
                    return held
            else:
                records = await self._claim(0 if sweep else self._cursor)
                if self._ranges:
                    await self._replay_claimed(records)
                if records:
                    return records
            if self._listener is None or self._listener.is_closed():
                if await self._listen():
                    continue  # inserts while nobody listened: claim once more before waiting
            with anyio.move_on_after(max(0.0, self._last_sweep + self.poll_s - self._clock())):
                await self._wake.wait()

    async def _claim(self, after: int) -> list[Record]:
        claim = self._sql.claim
        rows, _, started = await self._claimed_rows(
            self._sql.recover,
            lambda conn, token: conn.fetch(
                claim, after, self._mine, self.batch, token, self.lease_s
            ),
        )
        self.backlog = len(rows) >= self.batch
        if not rows:
            return []
        deadline = started + self.lease_s
        pending = self._pending
        records: list[Record] = []
        append = records.append
        for row_id, text, filed in rows:
            pending[row_id] = deadline
            if filed is not None:
                self._filed[row_id] = filed
            append((row_id, text.encode()))
        self._cursor = rows[-1][0]
        self.stats.rows_claimed += len(rows)
        return records

    async def _replay_claimed(self, records: list[Record]) -> None:
        """After a claim: is every row up to the replay range's end claimed now? (Claims go
        up in id order from a sweep at 0; a claim stops short before a row someone else
        still holds, so a short one asks the table whether any row up to the end is left.)"""
        end = self._replay_to
        if records and cast(int, records[-1][0]) >= end:
            self._ranges.end_after_read(self.name)
            return
        if len(records) >= self.batch:
            return
        check = self._sql.replay_left
        left = await retrying(
            "claim",
            self.name,
            self._pool,
            lambda conn: conn.fetchval(check, end, self._mine),
            backoff=self._backoff,
            on_retry=self._count_retry,
        )
        if left:
            return
        if records:
            self._ranges.end_after_read(self.name)
        else:
            self._ranges.end(self.name)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise SourceError(
                f"{self.name}: keeping leases failed: {describe_error(self._failure)}"
            ) from self._failure

    # -- acknowledging -----------------------------------------------------------------------

    async def ack(self, tokens: Sequence[Hashable]) -> None:
        """Delete these rows: one statement, retried until the database takes it."""
        if not tokens:
            return
        self._raise_failure()
        ids = cast("list[int]", list(tokens))
        delete = self._sql.delete
        await retrying(
            "ack",
            self.name,
            self._pool,
            lambda conn: conn.execute(delete, ids),
            backoff=self._backoff,
            on_retry=self._count_retry,
            outages=self.outages,
        )
        pending = self._pending
        part = self._part
        for row_id in ids:
            pending.pop(row_id, None)
            part.pop(row_id, None)
        if self._filed:  # rows that were invalid anyway: the engine never asked about them
            for row_id in ids:
                self._filed.pop(row_id, None)
        self.stats.rows_acked += len(ids)

    def misfiled(self, token: Hashable, key: str) -> str | None:
        """A row whose ``contact_id`` is not the string form of its change's ``ID``, or (with
        partitions) whose ``partition`` is not the one of its ID, is dead-lettered: it was
        ordered and partitioned by a key that is not the contact it changes."""
        filed = self._filed.pop(cast(int, token), None)
        if filed is not None:
            problem = key_mismatch(key, filed, "contact_id")
            if problem is not None:
                return problem
        if self.partitions > 1:
            p = self._part.get(cast(int, token))
            if p is not None:
                return partition_mismatch(key, p, self.partitions, f"{self.label} row {token}")
        return None

    def describe(self, tokens: Sequence[Hashable]) -> str:
        """``postgresql:table/id``, several ids joined by commas."""
        return f"{self.name}/" + ",".join(map(str, tokens))

    # -- leases ------------------------------------------------------------------------------

    async def _keep_leases(self) -> None:
        """Renew, before they run out, the leases of rows handed out and not acknowledged."""
        every = max(0.05, self.lease_s / 4)
        try:
            while True:
                await anyio.sleep(every)
                await self.renew_due()
        except Exception as exc:  # ends the run (and the next read or ack fails too)
            log.error("keeping leases failed", source=self.name, error=describe_error(exc))
            self._failure = exc
            raise SourceError(f"{self.name}: keeping leases failed: {describe_error(exc)}") from exc

    async def renew_due(self) -> int:
        """Renew the leases that run out within half a lease; the number renewed."""
        now = self._clock()
        horizon = now + self.lease_s / 2
        due = [row_id for row_id, deadline in self._pending.items() if deadline < horizon]
        if not due:
            return 0
        renew = self._sql.renew
        rows: list[Any] = await retrying(
            "renew",
            self.name,
            self._pool,
            lambda conn: conn.fetch(renew, due, self._mine, self.lease_s),
            backoff=self._backoff,
            on_retry=self._count_retry,
            outages=self.outages,
        )
        deadline = now + self.lease_s
        pending = self._pending
        renewed = {row[0] for row in rows}
        for row_id in due:
            if row_id not in pending:
                continue  # acknowledged meanwhile
            if row_id in renewed:
                pending[row_id] = deadline
            else:
                # Another worker took it after our lease ran out (an outage longer than the
                # lease) or it is gone; it is in our engine anyway, so only count it.
                del pending[row_id]
                self._part.pop(row_id, None)
                self.stats.rows_lost += 1
        lost = len(due) - len(renewed)
        if lost:
            log.warning("leases lost", source=self.name, rows=lost)
        self.stats.rows_renewed += len(renewed)
        return len(renewed)

    @property
    def in_flight(self) -> int:
        """Rows handed out and not acknowledged yet."""
        return len(self._pending)

    def statistics(self) -> SourceStatistics:
        """Reachable or not (and why), reconnects, rows in flight, partitions held, leases
        lost (rows whose lease ran out; partitions lost with the lock connection)."""
        problem = self.outages.problem
        stats = self.stats
        partitioned = self.partitions > 1
        lost = {"row": stats.rows_lost}
        if partitioned:
            lost["partition"] = stats.partitions_lost
        return SourceStatistics(
            available=not problem,
            problem=f"{self.target.display}: {problem}" if problem else "",
            reconnects=self.outages.started,
            unacked=len(self._pending),
            partitions_held=len(self._held) if partitioned else None,
            leases_lost=lost,
        )
