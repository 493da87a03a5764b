"""Connections to PostgreSQL: pools, retrying through outages, transactions, finding tables.

asyncpg ties this module to the asyncio backend of anyio.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio
import asyncpg
import structlog

from worker.backends.base import (
    Outages,
)
from worker.backends.postgres.uri import (
    ADVISORY_CLASS,
    CREATE_KEY,
    OutboxUri,
)
from worker.core.backoff import Backoff

log = structlog.get_logger("worker.backends.postgres")

T = TypeVar("T")

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


def describe_error(exc: BaseException) -> str:
    """A one-line description of a database or network error."""
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, asyncpg.PostgresError) else text


def gone(conn: Any) -> bool:
    """Whether a pooled connection died under us (asyncpg then says InterfaceError)."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True  # the pool took the lost connection back already


def drop(conn: Any) -> None:
    """Never reuse a connection that failed: asyncpg's state may be broken (asyncpg#1069)."""
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


CANCEL_GRACE_S = 5.0
"""How long a cancelled database operation is given to finish before it is cancelled too."""


async def unhurried(op: Callable[[], Awaitable[T]]) -> T:
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
                drop(conn)
                raise
            except asyncpg.InterfaceError as exc:
                if not gone(conn):
                    raise  # a real misuse, not an outage
                raise ConnectionResetError(f"connection lost: {exc}") from exc

    attempt = 0
    while True:
        try:
            result = await unhurried(once)
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
                if not gone(conn) and conn.is_in_transaction():
                    await conn.execute("ROLLBACK")
            except (asyncpg.InterfaceError, *TRANSIENT_ERRORS):
                drop(conn)
        if scope.cancelled_caught:
            drop(conn)
        raise
    return result


async def create_if_missing(conn: Any, ddl: str) -> None:
    """Run ``ddl`` (``CREATE ... IF NOT EXISTS`` statements) in a transaction under the
    advisory lock ``(ADVISORY_CLASS, CREATE_KEY)``. ``IF NOT EXISTS`` alone races: two
    sessions that both find no table both create it, and the second fails on the catalog's
    unique index (``pg_type_typname_nsp_index``, or ``type ... already exists``). Replicas
    started together on a fresh database did: all but one exited at start."""
    lock = f"SELECT pg_advisory_xact_lock({ADVISORY_CLASS}, {CREATE_KEY})"
    await in_transaction(conn, lock, lambda: conn.execute(ddl))


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
            " create it with `contact-worker init --to URI` (the DDL is in"
            " docs/inputs/postgresql.md)"
        )
    oid, schema, present = row
    missing = [c for c in columns if c not in present]
    if missing:
        raise MissingTable(
            f"table {qualified} in {target.display} lacks the column(s) {', '.join(missing)}:"
            " compare it with the DDL in docs/inputs/postgresql.md"
        )
    return int(oid), str(schema)


class CannotOpen(Exception):
    """A table cannot be opened: the message says which, where and why."""


async def pool_for_table(
    target: OutboxUri,
    what: str,
    name: str,
    columns: Sequence[str],
    *,
    max_size: int,
    **settings: str,
) -> tuple[Any, int, str]:
    """A pool for ``target`` and the oid and schema of its table ``name``, which must have
    these columns; CannotOpen (``what`` names the table for people) if either fails, the
    pool closed again."""
    pool: Any = None
    try:
        pool = await create_pool(target, max_size=max_size, **settings)
        async with pool.acquire() as conn:
            oid, schema = await find_table(conn, target, name, columns)
    except OPEN_ERRORS as exc:
        await close_pool(pool)
        raise CannotOpen(f"cannot open {what} at {target.display}: {describe_error(exc)}") from exc
    except MissingTable as exc:
        await close_pool(pool)
        raise CannotOpen(str(exc)) from exc
    return pool, oid, schema


async def close_pool(pool: Any) -> None:
    """Close a pool (None: nothing to do), terminating its connections if that takes long."""
    if pool is None:
        return
    try:
        with anyio.fail_after(5):
            await pool.close()
    except TimeoutError:
        pool.terminate()
