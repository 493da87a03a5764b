"""The ``sqlite:`` source: an embedded spool that upstream systems fill with ``POST /v1/changes``.

One SQLite file holds the changes not yet acknowledged (table ``changes``) and the dead letters
(table ``dead_letters``)::

    CREATE TABLE changes (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- the order of arrival, never reused
        change      BLOB    NOT NULL,                   -- one change object, JSON (UTF-8)
        received_at REAL    NOT NULL                    -- Unix time of the ingest commit
    );
    CREATE TABLE dead_letters (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        reason      TEXT    NOT NULL,                   -- not_found | rejected | invalid
        letter      TEXT    NOT NULL,                   -- the dead letter, JSON (README "Formats")
        created_at  REAL    NOT NULL
    );

The ingest (:mod:`.ingest`) inserts the changes of one request in one transaction; the
source hands rows out in ``id`` order and deletes them (one ``DELETE`` per ack call) once they
are applied or dead-lettered. ``AUTOINCREMENT`` matters: an ``id`` is never reused, even after
the highest row was deleted, so a row inserted later always sorts after every row handed out.

**What survives a power cut.** The database runs in WAL mode with ``synchronous=FULL``: a commit
returns only after the write-ahead log was fsynced, and the ingest answers ``202`` only after that
commit. So every change acknowledged with a 202 survives a crash of the process, of the
container, and a power cut (on a disk that honours fsync: not on a volume that lies about it,
nor on a network file system, where SQLite's locking is not safe either). A request that got no
answer may or may not be stored: the producer must send it again (before anything newer for the
same contacts, to keep their order); delivery is at least once.

Deletes (acks) are the one exception: they commit with ``synchronous=NORMAL``, which skips their
fsync. A power cut can undo the last deletes, and those changes are sent again after the restart,
which is harmless (PATCH is idempotent) and saves an fsync per ack. It cannot undo anything
committed before a ``FULL`` commit that survived: the WAL is append-only and fsync covers all of
it. Dead letters commit with ``FULL`` before the change is acknowledged.

**Threads.** sqlite3 blocks; every call runs in a worker thread, one at a time per database
(a capacity limiter of one around one connection), never on the event loop. Everything in this
process that names the same file (the source, the dead-letter sink, the ingest) shares one
:class:`Spool`: one connection, so one writer. The count of rows waiting (for the ingest's
high-water mark) is kept in memory and recounted when ``PRAGMA data_version`` shows that another
process (``contact-worker enqueue --to sqlite:...``) committed to the file.

**Order and delivery.** Rows are handed out in ``id`` order, each at most once per process; a row
handed out and not acknowledged is read again after a restart, in ``id`` order with the rest.
The rows in the spool at the start (up to its highest ``id`` then) may have been read before a
crash: they are a replay range (DESIGN 9), read in full before any of them is sent.

URI: ``sqlite:PATH[?name=value&...]``, PATH relative to the working directory or absolute
(``sqlite:/data/spool.db``), taken literally up to the first ``?``. Parameters: ``high_water``
(rows waiting above which the ingest answers 503, default 100000), ``max_body_bytes`` (largest
ingest body, default 10 MiB), ``batch`` (rows per read, default 1000), ``poll_s`` (fallback poll
for rows written by another process, default 1), ``busy_timeout_s`` (how long to wait for
another process's write lock, default 5); the grammar is :mod:`worker.backends.uri`. The
dead-letter sink takes the same URI (so ``--dlq`` may repeat ``--source``) and ignores the
parameters that are the source's.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar
from urllib.parse import parse_qsl

import anyio
import orjson
import structlog

from worker.backends.uri import integer, seconds, split_params
from worker.errors import ConfigError

log = structlog.get_logger("worker.backends.sqlite")

T = TypeVar("T")

SCHEMA = """\
CREATE TABLE IF NOT EXISTS changes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    change      BLOB    NOT NULL,
    received_at REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    reason      TEXT    NOT NULL,
    letter      TEXT    NOT NULL,
    created_at  REAL    NOT NULL
);
"""

_INSERT = "INSERT INTO changes (change, received_at) VALUES (?, ?)"
_SELECT = "SELECT id, change FROM changes WHERE id > ? ORDER BY id LIMIT ?"
# One statement and one parameter whatever the number of ids (no SQLITE_MAX_VARIABLE_NUMBER).
_DELETE = "DELETE FROM changes WHERE id IN (SELECT value FROM json_each(?))"
_INSERT_DEAD = "INSERT INTO dead_letters (reason, letter, created_at) VALUES (?, ?, ?)"

DEFAULT_HIGH_WATER = 100_000
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024


class SpoolError(Exception):
    """The spool database cannot be opened, read or written (the message names the file)."""


@dataclass(frozen=True, slots=True)
class SpoolOptions:
    """A parsed ``sqlite:`` URI."""

    path: str
    high_water: int = DEFAULT_HIGH_WATER
    """Rows waiting above which the ingest refuses more with 503 and Retry-After."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Largest ingest request body (413 above)."""
    count: int = 1000
    """Most rows handed out per read (URI ``batch``)."""
    poll_s: float = 1.0
    """Fallback poll while idle, for rows another process wrote (the ingest wakes the reader)."""
    busy_timeout_s: float = 5.0
    """How long a statement waits for another process's write lock."""


_PARAMS = ("high_water", "max_body_bytes", "batch", "poll_s", "busy_timeout_s")
"""The URI's parameters and their smallest allowed values."""


def parse_uri(uri: str) -> SpoolOptions:
    """Split ``sqlite:PATH?params`` into its options; ConfigError when it is not usable."""
    scheme, sep, rest = uri.partition(":")
    if scheme != "sqlite" or not sep:
        raise ConfigError(f"not a sqlite URI: {uri!r} (use sqlite:PATH)")
    path, _, query = rest.partition("?")
    if not path:
        raise ConfigError(f"sqlite URI {uri!r} names no file: use e.g. sqlite:spool.db")
    if path == ":memory:" or path.startswith("file:"):
        raise ConfigError(f"sqlite URI {uri!r}: the spool must be a file path (it must be durable)")
    values, _ = split_params(
        "sqlite",
        parse_qsl(query, keep_blank_values=True),
        _PARAMS,
        old=("count", "poll_ms", "busy_timeout_ms"),
    )
    defaults = SpoolOptions(path)
    return SpoolOptions(
        path,
        high_water=integer("sqlite", values, "high_water", defaults.high_water, 1),
        max_body_bytes=integer("sqlite", values, "max_body_bytes", defaults.max_body_bytes, 1),
        count=integer("sqlite", values, "batch", defaults.count, 1),
        poll_s=seconds("sqlite", values, "poll_s", defaults.poll_s, 0.001),
        busy_timeout_s=seconds("sqlite", values, "busy_timeout_s", defaults.busy_timeout_s, 0.0),
    )


class SpoolStatistics(NamedTuple):
    """The spool's counters, for metrics."""

    rows: int
    """Changes stored and not yet acknowledged (as this process knows them)."""
    appended: int
    """Changes stored by this process."""
    deleted: int
    """Rows deleted by acknowledgements."""
    dead_letters: int
    """Dead letters written by this process."""


class Spool:
    """One SQLite file: the changes not yet acknowledged and the dead letters.

    Every method that touches the database runs its statements in a worker thread, one call at a
    time; :meth:`append` and :meth:`add_dead_letters` return only once their commit is on disk.
    """

    def __init__(self, path: str, *, busy_timeout_s: float = 5.0) -> None:
        self.path = path
        self.name = os.path.basename(path) or path
        self.busy_timeout_s = busy_timeout_s
        self.rows = 0
        """Changes waiting: counted at open, then kept up to date by append and delete."""
        self.appended = 0
        self.deleted = 0
        self.dead_letters_written = 0
        self._conn: sqlite3.Connection | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._appended_event: anyio.Event | None = None
        self._data_version = 0
        self._key = ""
        self._users = 0

    # -- life cycle --------------------------------------------------------------------------

    async def open(self) -> None:
        """Create or open the file, switch to WAL, create the tables, count the rows waiting."""
        self._limiter = anyio.CapacityLimiter(1)
        self._appended_event = anyio.Event()
        try:
            self._conn, self.rows = await anyio.to_thread.run_sync(
                self._connect, limiter=self._limiter
            )
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot open spool {self.path}: {exc}") from exc
        except OSError as exc:
            raise SpoolError(f"cannot open spool {self.path}: {exc.strerror or exc}") from exc

    def _connect(self) -> tuple[sqlite3.Connection, int]:
        # isolation_level=None: no implicit transactions; ours are explicit BEGIN IMMEDIATE.
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise SpoolError(f"spool {self.path}: cannot switch to WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(changes)")}
            if not {"id", "change", "received_at"} <= columns:
                raise SpoolError(
                    f"{self.path} has a table 'changes' that is not a spool's"
                    f" (columns {sorted(columns)}): use another file"
                )
            rows = int(conn.execute("SELECT count(*) FROM changes").fetchone()[0])
            self._data_version = _data_version(conn)
            _fsync_directory(os.path.dirname(os.path.abspath(self.path)))
        except BaseException:
            conn.close()
            raise
        return conn, rows

    async def close(self) -> None:
        """Close the connection (SQLite checkpoints the WAL into the file)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await anyio.to_thread.run_sync(conn.close, limiter=self._limiter)
        except sqlite3.Error as exc:
            log.warning("closing the spool failed", path=self.path, error=str(exc))

    async def __aenter__(self) -> Spool:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- statements --------------------------------------------------------------------------

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise SpoolError(f"spool {self.path} is not open")
        try:
            # Not abandoned on cancellation: a commit under way finishes before anything else.
            return await anyio.to_thread.run_sync(fn, conn, limiter=self._limiter)
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.path}: {exc}") from exc

    async def append(self, changes: Sequence[bytes]) -> None:
        """Store these changes (JSON texts) in one transaction; durable when this returns."""
        if not changes:
            return
        now = time.time()
        rows = [(change, now) for change in changes]

        def insert(conn: sqlite3.Connection) -> int | None:
            recount = self._recount(conn)
            with _transaction(conn):
                conn.executemany(_INSERT, rows)
            return recount

        recount = await self._call(insert)
        self.rows = (self.rows if recount is None else recount) + len(rows)
        self.appended += len(rows)
        self._wake()

    async def fetch(self, after_id: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` rows with an id above ``after_id``, in id order."""

        def select(conn: sqlite3.Connection) -> tuple[list[tuple[int, bytes]], int | None]:
            recount = self._recount(conn)
            rows = conn.execute(_SELECT, (after_id, limit)).fetchall()
            # A row written by hand as TEXT comes back as str.
            return [(i, c if type(c) is bytes else str(c).encode()) for i, c in rows], recount

        rows, recount = await self._call(select)
        if recount is not None:
            self.rows = recount
        return rows

    async def delete(self, ids: Sequence[int]) -> int:
        """Delete these rows in one statement; returns how many were there."""
        if not ids:
            return 0
        payload = orjson.dumps(list(ids))

        def remove(conn: sqlite3.Connection) -> tuple[int, int | None]:
            recount = self._recount(conn)
            # A delete lost in a power cut only means the change is sent again: skip its fsync.
            conn.execute("PRAGMA synchronous=NORMAL")
            try:
                return conn.execute(_DELETE, (payload,)).rowcount, recount
            finally:
                conn.execute("PRAGMA synchronous=FULL")

        deleted, recount = await self._call(remove)
        self.rows = max(0, (self.rows if recount is None else recount) - deleted)
        self.deleted += deleted
        return deleted

    async def add_dead_letters(self, letters: Sequence[dict[str, Any]]) -> None:
        """Store these dead letters in one transaction; durable when this returns."""
        if not letters:
            return
        now = time.time()
        rows = [(str(letter["reason"]), orjson.dumps(letter).decode(), now) for letter in letters]

        def insert(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.executemany(_INSERT_DEAD, rows)

        await self._call(insert)
        self.dead_letters_written += len(rows)

    async def dead_letters(self, limit: int = -1) -> list[dict[str, Any]]:
        """The dead letters stored, oldest first (all of them unless ``limit``)."""

        def select(conn: sqlite3.Connection) -> list[str]:
            query = "SELECT letter FROM dead_letters ORDER BY id LIMIT ?"
            return [row[0] for row in conn.execute(query, (limit,))]

        return [orjson.loads(text) for text in await self._call(select)]

    async def last_id(self) -> int:
        """The highest ``id`` in the table now (0 when it is empty)."""

        def select(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT coalesce(max(id), 0) FROM changes").fetchone()[0])

        return await self._call(select)

    async def count(self) -> int:
        """Rows in the table now, counted (``rows`` is the cheap, kept-up-to-date figure)."""

        def select(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT count(*) FROM changes").fetchone()[0])

        return await self._call(select)

    def _recount(self, conn: sqlite3.Connection) -> int | None:
        """The rows now if another connection committed since we last looked, else None.

        Runs in the worker thread, before the caller's own statement; ``data_version`` changes
        only for other connections' commits, and reading it costs no I/O.
        """
        version = _data_version(conn)
        if version == self._data_version:
            return None
        self._data_version = version
        return int(conn.execute("SELECT count(*) FROM changes").fetchone()[0])

    # -- wake-ups and statistics -------------------------------------------------------------

    @property
    def appended_event(self) -> anyio.Event:
        """Set at the next append: take it BEFORE looking for rows, then wait on it."""
        if self._appended_event is None:
            raise SpoolError(f"spool {self.path} is not open")
        return self._appended_event

    def _wake(self) -> None:
        event, self._appended_event = self._appended_event, anyio.Event()
        if event is not None:
            event.set()

    def statistics(self) -> SpoolStatistics:
        """The counters now."""
        return SpoolStatistics(self.rows, self.appended, self.deleted, self.dead_letters_written)


class _transaction:
    """``BEGIN IMMEDIATE`` .. ``COMMIT``, rolled back on any error (runs in the worker thread)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is None:
            try:
                self.conn.execute("COMMIT")
                return
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def _fsync_directory(path: str) -> None:
    """Make a newly created file's directory entry durable (SQLite does it for the WAL only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- one spool per file per process ---------------------------------------------------------

_OPEN: dict[str, Spool] = {}


async def acquire_spool(path: str, *, busy_timeout_s: float = 5.0) -> Spool:
    """The open spool of this file, shared by everyone in this process; release it when done."""
    key = await anyio.to_thread.run_sync(os.path.realpath, path)
    spool = _OPEN.get(key)
    if spool is None:
        fresh = Spool(path, busy_timeout_s=busy_timeout_s)
        await fresh.open()
        spool = _OPEN.get(key)  # someone else may have opened it meanwhile
        if spool is None:
            spool = _OPEN[key] = fresh
            spool._key = key
        else:
            await fresh.close()
    spool._users += 1
    return spool


async def release_spool(spool: Spool) -> None:
    """One user fewer; the last one closes the spool."""
    spool._users -= 1
    if spool._users <= 0:
        if _OPEN.get(spool._key) is spool:
            del _OPEN[spool._key]
        await spool.close()


class SpoolUser:
    """A user of the process's one spool of a file: the source, the dead-letter sink."""

    options: SpoolOptions
    _spool: Spool | None

    async def _acquire(self) -> Spool:
        """The shared spool, opened (created) if this process had not yet; SpoolError."""
        options = self.options
        self._spool = await acquire_spool(options.path, busy_timeout_s=options.busy_timeout_s)
        return self._spool

    async def close(self) -> None:
        """Let go of the spool (closed when nothing else in the process uses it)."""
        spool, self._spool = self._spool, None
        if spool is not None:
            await release_spool(spool)
