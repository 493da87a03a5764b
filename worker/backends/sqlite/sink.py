"""The ``sqlite:`` dead-letter sink: rows of the spool file's ``dead_letters`` table."""

from __future__ import annotations

import os
from typing import Any

from worker.backends.sqlite.spool import (
    Spool,
    SpoolError,
    SpoolOptions,
    SpoolUser,
    parse_uri,
)
from worker.deadletters.base import DeadLetterError, DeadLetterSink


class SqliteDeadLetters(SpoolUser, DeadLetterSink):
    """Dead letters as rows of the spool file's ``dead_letters`` table, committed durably."""

    def __init__(self, options: SpoolOptions) -> None:
        self.options = options
        self.name = f"sqlite:{os.path.basename(options.path) or options.path}"
        self._spool: Spool | None = None
        self.written = 0

    @classmethod
    def from_uri(cls, uri: str) -> SqliteDeadLetters:
        """The sink a ``sqlite:`` URI names (not opened yet); ConfigError if the URI is bad."""
        return cls(parse_uri(uri))

    @property
    def spool(self) -> Spool:
        """The open spool; DeadLetterError before :meth:`open`."""
        if self._spool is None:
            raise DeadLetterError(f"dead letters {self.name}: not open")
        return self._spool

    async def open(self) -> None:
        """Open (create) the file and its tables."""
        try:
            await self._acquire()
        except SpoolError as exc:
            raise DeadLetterError(str(exc)) from exc

    async def write(self, letters: list[dict[str, Any]]) -> None:
        """Insert the letters in one transaction, fsynced before this returns."""
        if not letters:
            return
        try:
            await self.spool.add_dead_letters(letters)
        except SpoolError as exc:
            raise DeadLetterError(f"cannot write dead letters: {exc}") from exc
        self.written += len(letters)
