"""The ``postgresql://`` source: a transactional-outbox table, claimed in ``id`` order with a lease.

Upstream systems insert one row per change into the outbox table in the same transaction as their
own write (the wire format is in :mod:`worker.sources.pg_enqueue`). The worker claims rows in
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

import asyncio
import contextlib
import math
import os
import random
import re
import socket
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import anyio
import asyncpg
import structlog

from worker.config import ConfigError
from worker.core.backoff import Backoff
from worker.core.change import key_mismatch
from worker.core.partition import partition_mismatch, partition_of
from worker.sources.base import (
    Outages,
    Record,
    ReplayRanges,
    Source,
    SourceError,
    SourceStatistics,
)

log = structlog.get_logger("worker.sources.pg_outbox")

T = TypeVar("T")

DEFAULT_TABLE = "contact_changes"

DDL_TEMPLATE = """\
CREATE TABLE IF NOT EXISTS {table} (
    id            bigserial   PRIMARY KEY,
    contact_id    text        NOT NULL,
    change        jsonb       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    claimed_by    text,
    claimed_until timestamptz,
    partition     integer     NOT NULL DEFAULT 0
);

ALTER TABLE {table} ADD COLUMN IF NOT EXISTS partition integer NOT NULL DEFAULT 0;

CREATE INDEX IF NOT EXISTS {name}_part ON {table} (partition, id);

CREATE TABLE IF NOT EXISTS {table}_dead (
    id          bigserial   PRIMARY KEY,
    letter      jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    replayed_at timestamptz
);

ALTER TABLE {table}_dead ADD COLUMN IF NOT EXISTS replayed_at timestamptz;

CREATE OR REPLACE FUNCTION {table}_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, '');
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER {name}_notify
    AFTER INSERT ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION {table}_notify();
"""
"""The outbox, its dead-letter table and the wake-up trigger (PostgreSQL 14 or newer)."""

_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_MAX_NAME = 63 - len("_notify")  # the longest derived identifier must fit NAMEDATALEN

OUTBOX_COLUMNS = ("id", "contact_id", "change", "claimed_by", "claimed_until")

PARTITIONED_COLUMNS = (*OUTBOX_COLUMNS, "partition")
"""The columns a partitioned source needs (``partition`` came later: ``init`` adds it)."""

OWN_PARAMS = frozenset(
    {"table", "schema", "batch", "lease_s", "poll_s", "partitions", "rebalance_s"}
)
"""Query parameters the worker reads itself; the rest of the URI goes to asyncpg."""

ADVISORY_CLASS = 0x63775F6F  # "cw_o": the first key of the worker's advisory locks
"""Claims take the transaction-scoped advisory lock ``(ADVISORY_CLASS, <table oid>)``."""

MAX_PARTITIONS = 4096
PARTITION_TAG = 0x63770000  # "cw" in the high half: the second key of a partition's lock
"""A replica serving partition p of a table holds the session-level advisory lock
``(<table oid as int4>, PARTITION_TAG + p)`` on its lock connection."""
MEMBER_KEY = 0x6377FFFF
"""Every replica of a partitioned table holds ``(<table oid as int4>, MEMBER_KEY)`` in shared
mode: the number of holders is the number of live replicas."""
DRAIN_TIMEOUT_S = 30.0
"""A partition given back waits at most this long for its requests in flight before unlocking."""

RECONNECT_BACKOFF = Backoff(base_s=0.1, cap_s=5.0)
"""Waits between attempts while the database is unreachable: at most 5 s, so it resumes soon."""

COMMAND_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0

TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,  # class 08: connection lost or refused
    asyncpg.exceptions.OperatorInterventionError,  # class 57: shutdown, restart, cancel
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: too many connections
    asyncpg.exceptions.TransactionRollbackError,  # class 40: serialization, deadlock
    # A backend terminated while its connection sat idle can leave asyncpg's protocol state
    # broken ("cannot switch to state 15", MagicStack/asyncpg#1069): a new connection cures it.
    asyncpg.exceptions.InternalClientError,
)
"""Errors that a reconnect and a retry can cure: the database is restarting or unreachable."""

DATABASE_ERRORS: tuple[type[Exception], ...] = (asyncpg.PostgresError, *TRANSIENT_ERRORS)
"""Any error the database or the network to it can raise."""

OPEN_ERRORS: tuple[type[Exception], ...] = (*DATABASE_ERRORS, asyncpg.InterfaceError, ValueError)
"""What connecting can raise, a malformed DSN (bad port, unknown sslmode) included."""


def ddl(table: str = DEFAULT_TABLE, schema: str | None = None) -> str:
    """The DDL for one outbox table (names checked by :func:`parse_uri`)."""
    qualified = f"{schema}.{table}" if schema else table
    text = DDL_TEMPLATE.format(table=qualified, name=table)
    if schema:
        text = f"CREATE SCHEMA IF NOT EXISTS {schema};\n\n" + text
    return text


DDL = ddl()
"""The DDL as the README shows it: table ``contact_changes`` in the default schema."""


@dataclass(frozen=True, slots=True)
class OutboxUri:
    """A parsed ``postgresql://`` URI: where to connect, and the worker's own parameters."""

    dsn: str
    """What asyncpg gets: the URI without the worker's parameters."""
    display: str
    """The URI without password or parameters, for messages and logs."""
    table: str = DEFAULT_TABLE
    schema: str | None = None
    batch: int = 1000
    lease_s: float = 60.0
    poll_s: float = 5.0
    partitions: int = 1
    rebalance_s: float = 2.0
    server_settings: dict[str, str] = field(default_factory=dict)

    def qualify(self, name: str) -> str:
        """``schema.name``, or ``name`` when the URI names no schema (search_path decides)."""
        return f"{self.schema}.{name}" if self.schema else name

    @property
    def outbox(self) -> str:
        """The outbox table, qualified as in SQL."""
        return self.qualify(self.table)

    @property
    def dead(self) -> str:
        """The dead-letter table next to the outbox, qualified as in SQL."""
        return self.qualify(self.table + "_dead")


def _number(params: dict[str, str], name: str, default: float, *, integer: bool) -> float:
    raw = params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise ConfigError(f"postgresql URI: {name} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"postgresql URI: {name} must be > 0, got {raw!r}")
    return value


def _identifier(params: dict[str, str], name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if not _NAME.fullmatch(value) or len(value) > _MAX_NAME:
        raise ConfigError(
            f"postgresql URI: {name} must be a lowercase SQL name (a-z, 0-9, _) of at most"
            f" {_MAX_NAME} characters, got {value!r}"
        )
    return value


def parse_uri(uri: str) -> OutboxUri:
    """Split a ``postgresql://`` URI into the asyncpg DSN and the worker's parameters."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"not a postgresql:// URI: {uri!r}")
    try:
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ConfigError(f"postgresql URI: malformed query string {parts.query!r}") from None
    own = {k: v for k, v in query if k in OWN_PARAMS}
    rest = [(k, v) for k, v in query if k not in OWN_PARAMS]
    partitions = int(_number(own, "partitions", 1, integer=True))
    if partitions > MAX_PARTITIONS:
        raise ConfigError(f"postgresql URI: partitions must be at most {MAX_PARTITIONS}")
    dsn = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest)))
    user, _, host = parts.netloc.rpartition("@")
    user = user.partition(":")[0]  # never show the password
    display = f"{parts.scheme}://{user + '@' if user else ''}{host}{parts.path}"
    settings = (
        {}
        if any(k == "application_name" for k, _ in rest)
        else {"application_name": "contact-worker"}
    )
    return OutboxUri(
        dsn=dsn,
        display=display,
        table=_identifier(own, "table") or DEFAULT_TABLE,
        schema=_identifier(own, "schema"),
        batch=int(_number(own, "batch", 1000, integer=True)),
        lease_s=_number(own, "lease_s", 60.0, integer=False),
        poll_s=_number(own, "poll_s", 5.0, integer=False),
        partitions=partitions,
        rebalance_s=_number(own, "rebalance_s", 2.0, integer=False),
        server_settings=settings,
    )


def describe_error(exc: BaseException) -> str:
    """A one-line description of a database or network error."""
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, asyncpg.PostgresError) else text


def _gone(conn: Any) -> bool:
    """Whether a pooled connection died under us (asyncpg then says InterfaceError)."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True  # the pool took the lost connection back already


def _drop(conn: Any) -> None:
    """Never reuse a connection that failed: asyncpg's state may be broken (asyncpg#1069)."""
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


CANCEL_GRACE_S = 5.0
"""How long a cancelled database operation is given to finish before it is cancelled too."""


async def _unhurried(op: Callable[[], Awaitable[T]]) -> T:
    """Run ``op``; if the caller is cancelled meanwhile, let ``op`` finish first (for up to
    CANCEL_GRACE_S), then raise the cancellation.

    asyncpg cancelled half way leaves work behind: a connection cancelled while it is being
    opened leaves a TLS negotiation whose failure nobody retrieves (an error logged by the event
    loop), a query cancelled leaves a cancel request sent on a connection of its own. A reader
    stopped at shutdown mid-claim so finishes its claim (its rows are released by ``close``).
    """
    task = asyncio.ensure_future(op())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_GRACE_S):
            await asyncio.wait([task])
        if task.done():
            if not task.cancelled():
                task.exception()  # retrieved: its outcome no longer matters
        else:
            task.cancel()
        raise


async def retrying(
    what: str,
    target: str,
    pool: Any,
    op: Callable[[Any], Awaitable[T]],
    *,
    backoff: Backoff,
    on_retry: Callable[[], None] | None = None,
    outages: Outages | None = None,
) -> T:
    """Run ``op`` on a pooled connection until it succeeds, waiting out connection failures
    with capped backoff; a connection that failed is dropped, never reused. ``outages`` hears
    each failure and the success, as ``what``."""

    async def once() -> T:
        async with pool.acquire() as conn:
            try:
                return await op(conn)
            except TRANSIENT_ERRORS:
                _drop(conn)
                raise
            except asyncpg.InterfaceError as exc:
                if not _gone(conn):
                    raise  # a real misuse, not an outage
                raise ConnectionResetError(f"connection lost: {exc}") from exc

    attempt = 0
    while True:
        try:
            result = await _unhurried(once)
        except TRANSIENT_ERRORS as exc:
            attempt += 1
            delay = backoff.delay(attempt, random.random())
            log.warning(
                "postgresql unavailable: retrying",
                op=what,
                target=target,
                error=describe_error(exc),
                attempt=attempt,
                retry_in_s=round(delay, 3),
            )
            if on_retry is not None:
                on_retry()
            if outages is not None:
                outages.failed(what, describe_error(exc))
            await anyio.sleep(delay)
            continue
        if outages is not None:
            outages.recovered(what)
        if attempt:
            log.info("postgresql available again", op=what, target=target, attempts=attempt + 1)
        return result


async def in_transaction(conn: Any, first: str, op: Callable[[], Awaitable[T]]) -> T:
    """``BEGIN; first`` (one round trip), ``op``, ``COMMIT``; rolled back if anything fails.

    asyncpg's own transaction object raises a misleading InterfaceError when the connection
    dies inside it, and the pool complains about a transaction it must roll back itself.
    """
    try:
        await conn.execute(f"BEGIN; {first}")
        result = await op()
        await conn.execute("COMMIT")
    except BaseException:
        # Shielded: a cancelled claim (shutdown) must not leave the connection in a transaction.
        with anyio.CancelScope(shield=True), anyio.move_on_after(2) as scope:
            try:
                if not _gone(conn) and conn.is_in_transaction():
                    await conn.execute("ROLLBACK")
            except (asyncpg.InterfaceError, *TRANSIENT_ERRORS):
                _drop(conn)
        if scope.cancelled_caught:
            _drop(conn)
        raise
    return result


async def _rollback_if_needed(conn: Any) -> None:
    """The pool's reset: cheaper than asyncpg's default (one query per release)."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def create_pool(target: OutboxUri, *, max_size: int, **settings: str) -> Any:
    """An asyncpg pool for this URI; connection errors come out as they are."""
    return await asyncpg.create_pool(
        target.dsn,
        min_size=0,  # no background refilling (and its tracebacks) while the database is down
        max_size=max_size,
        timeout=CONNECT_TIMEOUT_S,
        command_timeout=COMMAND_TIMEOUT_S,
        server_settings={**target.server_settings, **settings},
        reset=_rollback_if_needed,
    )


class MissingTable(LookupError):
    """The table (or one of its columns) the URI names is not in the database."""


async def find_table(
    conn: Any, target: OutboxUri, name: str, columns: Sequence[str]
) -> tuple[int, str]:
    """The oid and schema of a table that must have these columns."""
    qualified = target.qualify(name)
    row = await conn.fetchrow(
        "SELECT c.oid::bigint, n.nspname::text,"
        " array(SELECT attname::text FROM pg_attribute"
        "       WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped)"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.oid = to_regclass($1)",
        qualified,
    )
    if row is None:
        raise MissingTable(
            f"table {qualified} does not exist in {target.display}:"
            " create it with `contact-worker init --to URI` (the DDL is in the README)"
        )
    oid, schema, present = row
    missing = [c for c in columns if c not in present]
    if missing:
        raise MissingTable(
            f"table {qualified} in {target.display} lacks the column(s) {', '.join(missing)}:"
            " compare it with the DDL in the README"
        )
    return int(oid), str(schema)


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


class PgOutboxSource(Source):
    """Rows of an outbox table, in ``id`` order; an infinite source (``read`` never ends)."""

    files_by_key = True  # contact_id (and partition) beside the change

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
        self._keeper: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._sql = _Statements(target.outbox)
        self.partitions = target.partitions
        self.rebalance_s = target.rebalance_s
        self._held: set[int] = set()
        """Partitions this replica claims rows of (their locks are held)."""
        self._draining: dict[int, tuple[int, float]] = {}
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
        self._rebalancer: asyncio.Task[None] | None = None
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

    @classmethod
    def from_uri(cls, uri: str) -> PgOutboxSource:
        """The source a ``postgresql://`` URI names (not opened yet)."""
        return cls(parse_uri(uri))

    # -- opening and closing -----------------------------------------------------------------

    async def open(self) -> None:
        """Connect, check the table, listen for inserts, start keeping leases."""
        target = self.target
        try:
            self._pool = await create_pool(target, max_size=4)
            columns = PARTITIONED_COLUMNS if self.partitions > 1 else OUTBOX_COLUMNS
            async with self._pool.acquire() as conn:
                oid, schema = await find_table(conn, target, target.table, columns)
        except OPEN_ERRORS as exc:
            await self._close_pool()
            raise SourceError(
                f"cannot open {self.name} at {target.display}: {describe_error(exc)}"
            ) from exc
        except MissingTable as exc:
            await self._close_pool()
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
        self._keeper = asyncio.create_task(self._keep_leases(), name=f"{self.name} leases")
        if self.partitions > 1:
            self._sql.partitioned(target.outbox, lock_key)
            with contextlib.suppress(*DATABASE_ERRORS, asyncpg.InterfaceError):
                await self.rebalance()  # take a share now; the rebalancer retries otherwise
            self._rebalancer = asyncio.create_task(
                self._keep_partitions(), name=f"{self.name} partitions"
            )

    async def close(self) -> None:
        """Release the rows not acknowledged (for the next worker, at once) and disconnect."""
        for task in (self._keeper, self._rebalancer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._keeper = self._rebalancer = None
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
        await self._close_locks()  # after the release: the next owner finds the rows free
        await self._unlisten()
        await self._close_pool()

    async def _close_pool(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                with anyio.fail_after(5):
                    await pool.close()
            except TimeoutError:
                pool.terminate()

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

    async def read(self) -> Sequence[Record] | None:
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
                records = await self._claim_partitions(0 if sweep else self._cursor)
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

    async def _claim(self, after: int) -> list[Record]:
        claim = self._sql.claim
        rows, _, started = await self._claimed_rows(
            self._sql.recover,
            lambda conn, token: conn.fetch(
                claim, after, self._mine, self.batch, token, self.lease_s
            ),
        )
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

    def _count_retry(self) -> None:
        self.stats.retries += 1

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise SourceError(
                f"{self.name}: keeping leases failed: {describe_error(self._failure)}"
            ) from self._failure

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

    async def _claim_partitions(self, after: int) -> list[Record]:
        """Claim the lowest-id rows of the held partitions, leases of others ignored: holding a
        partition's lock means its previous holder is gone (or gave it back when idle)."""
        held = sorted(self._held)
        if not held or self._locks is None:
            return []
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
        if not rows:
            if self._replay_parts:
                self._replay_partitions(gains, 0, 0, handed=False)
            return []
        deadline = started + self.lease_s
        pending = self._pending
        part = self._part
        still = self._held  # a partition may have gone while the claim ran
        records: list[Record] = []
        stale: list[int] = []
        for row_id, p, text, filed in rows:
            if p not in still:
                stale.append(row_id)
                continue
            pending[row_id] = deadline
            part[row_id] = p
            if filed is not None:
                self._filed[row_id] = filed
            records.append((row_id, text.encode()))
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
        self.stats.rows_claimed += len(records)
        return records

    def _forget(self, partitions: set[int]) -> int:
        """Have the engine forget the waiting changes of these partitions; how many."""
        for p in partitions:  # given up: their replay ranges too
            self._replay_parts.pop(p, None)
            self._ranges.end(self._range_name(p))
        if self.revoke is None or not partitions:
            return 0
        count = self.partitions
        return self.revoke(lambda key: partition_of(key, count) in partitions)

    def _lose_all(self, reason: str) -> None:
        """The lock connection is gone, and its locks with it: stop claiming every partition
        at once and forget their waiting changes (requests in flight still finish)."""
        lost = self._held | set(self._draining)
        conn, self._locks, self._lock_pid = self._locks, None, 0
        if conn is not None:
            conn.remove_termination_listener(self._locks_closed)
            _drop(conn)
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
            _drop(conn)
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
            _drop(conn)

    async def rebalance(self) -> None:
        """One tick: (re)connect the lock connection, count the live replicas, unlock the
        partitions given back once their requests in flight ended, give back partitions above
        the fair share ``ceil(partitions / live)``, take free ones up to it."""
        conn = self._locks
        if conn is None or _gone(conn):
            self._lose_all("lock connection lost")
            conn = await self._connect_locks()
        sql = self._sql
        try:
            live = int(await conn.fetchval(sql.members, self._oid))
            share = math.ceil(self.partitions / max(1, live))
            now = self._clock()
            for p, (forgotten, deadline) in list(self._draining.items()):
                left = [row_id for row_id, part in self._part.items() if part == p]
                if len(left) > forgotten and now < deadline:
                    continue  # requests in flight: the next holder must not overtake them
                for row_id in left:
                    del self._part[row_id]
                    self._pending.pop(row_id, None)
                await conn.execute(sql.unlock, p)
                del self._draining[p]
                self.stats.partitions_given_back += 1
                log.info("partition given back", source=self.name, partition=p, live=live)
            extra = len(self._held) - share
            if extra > 0:
                give = set(sorted(self._held)[-extra:])
                self._held -= give
                for p in give:  # one by one: the engine counts the rows it forgot
                    self._draining[p] = (self._forget({p}), now + DRAIN_TIMEOUT_S)
                self._rebalance_wake.set()  # unlock as soon as the next tick allows
            want = share - len(self._held) - len(self._draining)
            if want > 0:
                free = await conn.fetch(sql.free, self._oid, self.partitions)
                for (p,) in free:
                    if want <= 0:
                        break
                    if p in self._held or p in self._draining:
                        continue
                    if not await conn.fetchval(sql.try_lock, p):
                        continue
                    # Rows claimed before (by a replica that died, or by this one in an
                    # earlier turn) may have been sent: up to the last of them, a replay range.
                    end = int(await conn.fetchval(sql.replay_end_p, p))
                    # Rows this replica claimed in an earlier turn of the partition (then
                    # forgotten) would be skipped as its own: free them first.
                    await conn.execute(sql.release_partition, p, self._mine)
                    self._held.add(p)
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
        except Exception as exc:  # surfaced by the next read or ack
            log.error("keeping partitions failed", source=self.name, error=describe_error(exc))
            self._lose_all("keeping partitions failed")
            self._failure = exc

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
        except Exception as exc:  # surfaced by the next read or ack
            log.error("keeping leases failed", source=self.name, error=describe_error(exc))
            self._failure = exc

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


def _first(row: Any) -> Any:
    return row[0]


# A line that was not JSON (or held a NUL, which jsonb refuses) travels as a JSON string (see
# pg_enqueue): hand its text to the decoder, which dead-letters it like the jsonl: source would
# (or takes it, NUL and all). A change is an object, so a string is never meant as one.
_PAYLOAD = (
    "CASE WHEN jsonb_typeof(t.change) = 'string' THEN t.change #>> '{}' ELSE t.change::text END"
)
# The row's contact_id where it differs from the text of the change's ID (NULL mostly: the
# usual row costs nothing more); the source compares the string forms itself. A raw line
# (above) has its ID in its text: its contact_id, unless '' (no ID: the decoder says so).
_FILED = (
    "CASE WHEN jsonb_typeof(t.change) = 'string' THEN NULLIF(t.contact_id, '')"
    " ELSE NULLIF(t.contact_id, t.change ->> 'ID') END"
)


class _Statements:
    """The source's SQL for one table."""

    def __init__(self, table: str) -> None:
        # Candidates: the lowest ids after $1 that are not ours. Claim them up to (not
        # including) the first one whose lease someone else still holds.
        # ``id = ANY(ARRAY(...))``: index look-ups, where a join would make the planner hash
        # (and so scan) the whole table for every claim.
        self.claim = f"""
WITH candidate AS (
    SELECT id, claimed_until FROM {table}
    WHERE id > $1 AND (claimed_by IS NULL OR NOT starts_with(claimed_by, $2))
    ORDER BY id
    LIMIT $3
)
UPDATE {table} AS t
SET claimed_by = $4, claimed_until = now() + make_interval(secs => $5)
WHERE t.id = ANY(ARRAY(
    SELECT id FROM candidate
    WHERE id < (SELECT coalesce(min(id), 9223372036854775807) FROM candidate
                WHERE claimed_until > now())
))
RETURNING t.id, {_PAYLOAD}, {_FILED}"""
        self.recover = f"""
UPDATE {table} AS t SET claimed_until = now() + make_interval(secs => $2)
WHERE claimed_by = $1
RETURNING t.id, {_PAYLOAD}, {_FILED}"""
        self.renew = f"""
UPDATE {table} SET claimed_until = now() + make_interval(secs => $3)
WHERE id = ANY($1::bigint[]) AND starts_with(claimed_by, $2)
RETURNING id"""
        self.release = f"""
UPDATE {table} SET claimed_by = NULL, claimed_until = NULL
WHERE starts_with(claimed_by, $1)"""
        self.delete = f"DELETE FROM {table} WHERE id = ANY($1::bigint[])"
        self.replay_end = f"SELECT coalesce(max(id), 0) FROM {table} WHERE claimed_by IS NOT NULL"
        self.replay_left = f"""
SELECT EXISTS (SELECT 1 FROM {table}
               WHERE id <= $1 AND (claimed_by IS NULL OR NOT starts_with(claimed_by, $2)))"""

    def partitioned(self, table: str, lock_key: int) -> None:
        """The statements of a partitioned source; ``lock_key`` is the table oid as an int4."""
        # A lock (key1, key2) shows in pg_locks as classid = key1, objid = key2 (as oids),
        # objsubid 2; the table oid is key1 read unsigned.
        held_by = (
            "l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND l.classid = ($1::bigint)::oid"
        )
        self.join = f"SELECT pg_advisory_lock_shared({lock_key}, {MEMBER_KEY})"
        self.members = (
            f"SELECT count(*) FROM pg_locks l WHERE {held_by} AND l.objid = {MEMBER_KEY}::oid"
        )
        self.free = f"""
SELECT p FROM generate_series(0, $2::int - 1) AS p
WHERE NOT EXISTS (
    SELECT 1 FROM pg_locks l WHERE {held_by} AND l.objid = ({PARTITION_TAG} + p)::bigint::oid
)
ORDER BY p"""
        self.try_lock = f"SELECT pg_try_advisory_lock({lock_key}, {PARTITION_TAG} + $1::int)"
        self.unlock = f"SELECT pg_advisory_unlock({lock_key}, {PARTITION_TAG} + $1::int)"
        self.replay_end_p = f"""
SELECT coalesce(max(id), 0) FROM {table} WHERE partition = $1 AND claimed_by IS NOT NULL"""
        self.release_partition = f"""
UPDATE {table} SET claimed_by = NULL, claimed_until = NULL
WHERE partition = $1 AND starts_with(claimed_by, $2)"""
        self.release_ids = f"""
UPDATE {table} SET claimed_by = NULL, claimed_until = NULL
WHERE id = ANY($1::bigint[]) AND claimed_by = $2"""
        # Only partitions whose lock the lock connection ($7) still holds at claim time: a
        # replica whose lock connection just died claims nothing more, even before it notices.
        locked = held_by.replace("$1::bigint", "$8::bigint")
        self.claim_p = f"""
WITH held AS (
    SELECT p FROM unnest($6::int[]) AS p
    WHERE EXISTS (SELECT 1 FROM pg_locks l WHERE {locked} AND l.pid = $7
                  AND l.objid = ({PARTITION_TAG} + p)::bigint::oid)
)
UPDATE {table} AS t
SET claimed_by = $4, claimed_until = now() + make_interval(secs => $5)
WHERE t.id = ANY(ARRAY(
    SELECT id FROM {table}
    WHERE partition = ANY(ARRAY(SELECT p FROM held)) AND id > $1
      AND (claimed_by IS NULL OR NOT starts_with(claimed_by, $2))
    ORDER BY id
    LIMIT $3
))
RETURNING t.id, t.partition, {_PAYLOAD}, {_FILED}"""
        self.recover_p = f"""
UPDATE {table} AS t SET claimed_until = now() + make_interval(secs => $2)
WHERE claimed_by = $1
RETURNING t.id, t.partition, {_PAYLOAD}, {_FILED}"""
