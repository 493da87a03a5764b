"""The coalescer: per-ID merging of waiting changes, at most one request in flight per ID."""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from worker.core.change import Change


@dataclass(slots=True)
class Entry:
    """All the waiting changes of one contact, merged field by field into one object to send."""

    key: str
    body: dict[str, Any]
    tokens: list[Hashable]
    seq: int
    """Arrival number of the oldest change merged here: the fairness order."""
    since: float
    """Arrival time of the oldest change merged here: what linger is measured from."""
    encoded: bytes | None = field(default=None, repr=False)


class Coalescer:
    """Holds waiting changes per ID and hands out, oldest first, the IDs that may be sent now.

    An ID is *ready* when it has waiting changes and no request in flight. Changes to an ID in
    flight keep merging and become ready only when :meth:`release` says the older request ended,
    so per-ID order holds whatever happens to that request.
    """

    def __init__(self) -> None:
        self._waiting: dict[str, Entry] = {}
        self._in_flight: set[str] = set()
        self._ready: list[tuple[int, str]] = []  # heap of (seq, key)
        self._seq = 0
        self.changes_waiting = 0
        """Changes held here (merged or not): what the source's bound is measured against."""
        self.coalesced = 0
        """Changes merged into an already waiting change of the same ID."""

    def add(self, change: Change, now: float) -> None:
        """Take one valid change; later values win over earlier ones of the same ID."""
        key = change.key
        entry = self._waiting.get(key)
        self.changes_waiting += 1
        if entry is not None:
            entry.body.update(change.fields)
            entry.tokens.append(change.token)
            entry.encoded = None
            self.coalesced += 1
            return
        self._seq += 1
        self._waiting[key] = Entry(key, change.fields, [change.token], self._seq, now)
        if key not in self._in_flight:
            heapq.heappush(self._ready, (self._seq, key))

    @property
    def ready_count(self) -> int:
        """How many IDs could be put in a request right now."""
        return len(self._ready)

    @property
    def ids_waiting(self) -> int:
        """How many IDs have waiting changes (in flight or not)."""
        return len(self._waiting)

    @property
    def ids_in_flight(self) -> int:
        """How many IDs are in a request that has not ended."""
        return len(self._in_flight)

    def peek(self) -> Entry | None:
        """The ready entry with the oldest waiting change, left in place."""
        if not self._ready:
            return None
        return self._waiting[self._ready[0][1]]

    def pop(self) -> Entry:
        """Take the oldest ready entry; its ID is in flight until :meth:`release`."""
        _, key = heapq.heappop(self._ready)
        entry = self._waiting.pop(key)
        self._in_flight.add(key)
        self.changes_waiting -= len(entry.tokens)
        return entry

    def release(self, key: str) -> None:
        """The request holding ``key`` ended (applied or dead-lettered): newer changes may go."""
        self._in_flight.discard(key)
        entry = self._waiting.get(key)
        if entry is not None:
            heapq.heappush(self._ready, (entry.seq, key))

    def is_in_flight(self, key: str) -> bool:
        """Whether a request holding ``key`` has not ended yet."""
        return key in self._in_flight
