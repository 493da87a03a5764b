"""The ``sqlite:`` source: the spool's rows in ``id`` order, deleted once acknowledged."""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from typing import cast

import anyio
import structlog

from worker.backends.base import (
    Record,
    ReplayRanges,
    Source,
    SourceError,
    SourceStatistics,
)
from worker.backends.sqlite.spool import (
    Spool,
    SpoolError,
    SpoolOptions,
    SpoolUser,
    parse_uri,
)

log = structlog.get_logger("worker.backends.sqlite")


class SqliteSpoolSource(SpoolUser, Source):
    """Rows of the spool in id order; an ack deletes them. Never ends: it waits for more."""

    def __init__(self, options: SpoolOptions) -> None:
        self.options = options
        self.name = os.path.basename(options.path) or options.path
        self._spool: Spool | None = None
        self._cursor = 0
        """The highest id handed out: rows at or below it are in the engine's hands."""
        self._replay_to = 0
        """The highest id of the rows in the spool at the start (the replay range's end)."""
        self._ranges = ReplayRanges(self)
        self.rows_read = 0
        self.rows_acked = 0

    @classmethod
    def from_uri(cls, uri: str) -> SqliteSpoolSource:
        """The source a ``sqlite:`` URI names (not opened yet); ConfigError if the URI is bad."""
        return cls(parse_uri(uri))

    @property
    def spool(self) -> Spool:
        """The open spool (for the ingest routes); SourceError before :meth:`open`."""
        if self._spool is None:
            raise SourceError(f"sqlite:{self.name} is not open")
        return self._spool

    async def open(self) -> None:
        """Open (create) the spool; reading starts at its lowest id."""
        try:
            spool = await self._acquire()
        except SpoolError as exc:
            raise SourceError(str(exc)) from exc
        self._cursor = 0
        try:
            self._replay_to = await spool.last_id()
        except SpoolError as exc:
            await self.close()
            raise SourceError(str(exc)) from exc
        if self._replay_to:
            self._ranges.begin(self.name)
        log.info("spool open", path=self.options.path, rows_waiting=spool.rows)

    async def read(self) -> Sequence[Record]:
        """The next rows after those handed out, waiting for the ingest (or a poll) if none."""
        spool = self.spool
        count, poll_s = self.options.count, self.options.poll_s
        ranges = self._ranges
        if ranges:
            ranges.sync()
            if self._cursor >= self._replay_to:
                ranges.end(self.name)
        while True:
            woken = spool.appended_event  # taken first: an append during the fetch still wakes
            try:
                rows = await spool.fetch(self._cursor, count)
            except SpoolError as exc:
                raise SourceError(str(exc)) from exc
            self.backlog = len(rows) >= count
            if rows:
                self._cursor = rows[-1][0]
                self.rows_read += len(rows)
                return rows
            if ranges:  # nothing left of the rows there at the start: all were handed out
                ranges.end(self.name)
            with anyio.move_on_after(poll_s):
                await woken.wait()

    async def ack(self, tokens: Sequence[Hashable]) -> None:
        """Delete these rows (one statement)."""
        try:
            await self.spool.delete(cast("list[int]", tokens))
        except SpoolError as exc:
            raise SourceError(str(exc)) from exc
        self.rows_acked += len(tokens)

    def describe(self, tokens: Sequence[Hashable]) -> str:
        """``sqlite:spool.db/42``, several ids joined by commas."""
        return f"sqlite:{self.name}/" + ",".join(str(t) for t in tokens)

    def statistics(self) -> SourceStatistics:
        """Rows handed out and not acknowledged; the spool's depth (rows stored, read or not).

        Always available: a local file that fails stops the run instead (SourceError)."""
        spool = self._spool
        return SourceStatistics(
            unacked=self.rows_read - self.rows_acked,
            spool_depth=spool.rows if spool is not None else None,
        )
