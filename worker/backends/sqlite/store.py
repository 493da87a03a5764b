"""The ``sqlite:PATH`` dead letters: the spool file's table ``dead_letters``.

Replayed letters are recorded in a table of the same file that ``dlq replay`` creates::

    CREATE TABLE IF NOT EXISTS dead_letters_replayed (
        id          INTEGER PRIMARY KEY,  -- dead_letters.id
        replayed_at TEXT    NOT NULL      -- UTC, ISO 8601
    );

committed with ``synchronous=FULL``. When the replay's input is the same spool file (the usual
case), the changes are inserted into ``changes`` and marked in one transaction: each letter is
replayed exactly once. A replay holds an exclusive ``flock`` on the file (SQLite's own locks
are ``fcntl`` locks, which this does not touch) so that two replays cannot both send a letter.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import IO, TypeVar

import anyio

from worker.backends.sqlite.spool import SpoolOptions, parse_uri
from worker.deadletters.store import PAGE, DeadLetterStore, IdPages, StoreBusy, StoreError
from worker.deadletters.summary import Stored

T = TypeVar("T")

REPLAYED_TABLE = """\
CREATE TABLE IF NOT EXISTS dead_letters_replayed (
    id          INTEGER PRIMARY KEY,
    replayed_at TEXT    NOT NULL
)"""

_MARK = "INSERT OR IGNORE INTO dead_letters_replayed (id, replayed_at) VALUES (?, ?)"
_INSERT_CHANGE = "INSERT INTO changes (change, received_at) VALUES (?, ?)"


class SqliteStore(DeadLetterStore):
    """Reads a spool's ``dead_letters`` in ``id`` order; marks them in ``dead_letters_replayed``."""

    def __init__(self, options: SpoolOptions) -> None:
        self.options = options
        self.path = options.path
        self.name = f"sqlite:{options.path} dead_letters"
        self._conn: sqlite3.Connection | None = None
        self._lock_file: IO[bytes] | None = None
        self._marks = False
        self._pages = IdPages()

    @classmethod
    def from_uri(cls, uri: str) -> SqliteStore:
        """The store a ``sqlite:`` URI names; ConfigError if the URI is bad."""
        return cls(parse_uri(uri))

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise StoreError(f"{self.name}: not open")
        try:
            return await anyio.to_thread.run_sync(fn, conn)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    async def open(self, *, replay: bool = False) -> None:
        """Open the existing file, fix the end at the highest id; lock it for a replay."""
        await anyio.to_thread.run_sync(self._open, replay)

    def _open(self, replay: bool) -> None:
        if not os.path.isfile(self.path):
            raise StoreError(f"no spool file {self.path}")
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self.options.busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc
        self._conn = conn
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
            if "dead_letters" not in tables:
                raise StoreError(f"{self.path} has no table dead_letters: is it a spool?")
            self._marks = "dead_letters_replayed" in tables
            if replay:
                self._lock(conn)
            end = conn.execute("SELECT coalesce(max(id), 0) FROM dead_letters").fetchone()[0]
            self._pages.end = int(end)
        except sqlite3.Error as exc:
            self._close()
            raise StoreError(f"{self.path}: {exc}") from exc
        except StoreError:
            self._close()
            raise

    def _lock(self, conn: sqlite3.Connection) -> None:
        self._lock_file = open(self.path, "rb")
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreBusy(f"another `dlq replay` is working on {self.path}") from None
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(REPLAYED_TABLE)
        self._marks = True

    async def read(self, size: int = PAGE) -> list[Stored]:
        """The next dead letters up to the highest id there was at open."""
        if self._pages.done:
            return []
        replayed = "r.id IS NOT NULL" if self._marks else "0"
        join = " LEFT JOIN dead_letters_replayed r ON r.id = d.id" if self._marks else ""
        query = (
            f"SELECT d.id, d.letter, {replayed} FROM dead_letters d{join}"
            " WHERE d.id > ? AND d.id <= ? ORDER BY d.id LIMIT ?"
        )
        after, end = self._pages.after, self._pages.end
        rows = await self._call(lambda conn: conn.execute(query, (after, end, size)).fetchall())
        return self._pages.letters(rows)

    async def mark(self, keys: Sequence[str], at: str) -> None:
        """Record these letters as replayed, in one durable transaction."""
        marks = [(int(key), at) for key in keys]

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_MARK, marks)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        await self._call(write)

    def holds_input(self, uri: str) -> bool:
        """Whether the input ``uri`` is this spool file."""
        if uri.partition(":")[0] != "sqlite":
            return False
        other = parse_uri(uri).path
        try:
            return os.path.samefile(other, self.path)
        except OSError:
            return False

    async def insert_and_mark(
        self, uri: str, keys: Sequence[str], lines: Sequence[bytes], at: str
    ) -> int:
        """Append the changes to this spool's ``changes`` and mark their letters, in one
        durable transaction. The rows appended."""
        marks = [(int(key), at) for key in keys]
        rows = [(line, time.time()) for line in lines]

        def write(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_INSERT_CHANGE, rows)
                conn.executemany(_MARK, marks)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return len(rows)

        return await self._call(write)

    async def close(self) -> None:
        """Close the connection and release the lock."""
        self._close()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        lock, self._lock_file = self._lock_file, None
        if lock is not None:
            lock.close()
