"""The interface every dead-letter store implements for ``dlq show`` and ``dlq replay``."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import orjson

from worker.deadletters.summary import Stored

# Re-exported: the stores import them from here.
from worker.errors import StoreBusy as StoreBusy
from worker.errors import StoreError as StoreError

PAGE = 1000
"""Letters per read: memory stays bounded whatever the size of the store."""


def letter_of(text: str | bytes) -> dict[str, Any] | None:
    """A dead letter from its JSON text; None if the text is not a JSON object."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class IdPages:
    """Where a store reading a table page by page in ``id`` order stands: after ``after``, up
    to ``end``, the highest id there was at open (0 until then: nothing to read)."""

    def __init__(self) -> None:
        self.after = 0
        self.end = 0

    @property
    def done(self) -> bool:
        """Every letter up to the end was read."""
        return self.after >= self.end

    def letters(self, rows: Sequence[Sequence[Any]]) -> list[Stored]:
        """One page's rows ``(id, letter JSON, replayed)`` as letters; an empty page is the
        end (rows deleted meanwhile)."""
        if not rows:
            self.after = self.end
            return []
        self.after = int(rows[-1][0])
        return [Stored(str(row[0]), letter_of(row[1]), bool(row[2])) for row in rows]


class DeadLetterStore(abc.ABC):
    """Dead letters as a sink left them, read in the order they were written.

    :meth:`open` fixes the end: letters written after it (by a worker still running, perhaps
    dead-lettering the very changes being replayed) are left for the next run, so a replay
    always ends.
    """

    name: str = "dead letters"

    @abc.abstractmethod
    async def open(self, *, replay: bool = False) -> None:
        """Connect and fix the end. With ``replay``, also take the store's replay lock
        (:class:`StoreBusy` if another replay holds it) and check that letters can be marked."""

    @abc.abstractmethod
    async def read(self, size: int = PAGE) -> list[Stored]:
        """The next letters, at most ``size``, up to the end fixed by :meth:`open`; [] at it."""

    @abc.abstractmethod
    async def mark(self, keys: Sequence[str], at: str) -> None:
        """Remember durably that these letters were replayed at ``at`` (UTC, ISO 8601)."""

    def notes(self) -> list[str]:
        """What a person should know about what was read: lines torn or not letters, say."""
        return []

    def holds_input(self, uri: str) -> bool:
        """Whether the input ``uri`` lives in this store, so that a replay into it can write
        the changes and mark their letters in one transaction (:meth:`insert_and_mark`)."""
        return False

    async def insert_and_mark(
        self, uri: str, keys: Sequence[str], lines: Sequence[bytes], at: str
    ) -> int:
        """Write the changes to the input ``uri`` and mark the letters ``keys`` atomically;
        the changes written. Only where :meth:`holds_input` says so."""
        raise NotImplementedError(f"{self.name} cannot write to {uri}")

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the replay lock and the connection."""
