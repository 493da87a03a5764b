"""The coalescer: per-ID merging of waiting changes, at most one request in flight per ID."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Hashable
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
        # Ready IDs in two queues, oldest first: new IDs arrive in seq order, so a plain FIFO
        # holds them; only IDs made ready again by release() need a heap.
        self._fresh: deque[str] = deque()
        self._again: list[tuple[int, str]] = []
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
            self._fresh.append(key)

    @property
    def ready_count(self) -> int:
        """How many IDs could be put in a request right now."""
        return len(self._fresh) + len(self._again)

    @property
    def ids_waiting(self) -> int:
        """How many IDs have waiting changes (in flight or not)."""
        return len(self._waiting)

    @property
    def ids_in_flight(self) -> int:
        """How many IDs are in a request that has not ended."""
        return len(self._in_flight)

    def _oldest_key(self) -> str | None:
        fresh, again = self._fresh, self._again
        if not again:
            return fresh[0] if fresh else None
        if fresh and self._waiting[fresh[0]].seq < again[0][0]:
            return fresh[0]
        return again[0][1]

    def peek(self) -> Entry | None:
        """The ready entry with the oldest waiting change, left in place."""
        key = self._oldest_key()
        return None if key is None else self._waiting[key]

    def pop(self) -> Entry:
        """Take the oldest ready entry; its ID is in flight until :meth:`release`."""
        fresh, again = self._fresh, self._again
        if again and not (fresh and self._waiting[fresh[0]].seq < again[0][0]):
            key = heapq.heappop(again)[1]
        else:
            key = fresh.popleft()
        entry = self._waiting.pop(key)
        self._in_flight.add(key)
        self.changes_waiting -= len(entry.tokens)
        return entry

    def release(self, key: str) -> None:
        """The request holding ``key`` ended (applied or dead-lettered): newer changes may go."""
        self._in_flight.discard(key)
        entry = self._waiting.get(key)
        if entry is not None:
            heapq.heappush(self._again, (entry.seq, key))

    def forget(self, drop: Callable[[str], bool]) -> list[Entry]:
        """Remove the waiting changes of the IDs ``drop`` selects (a partition this replica lost).

        Requests in flight are not touched; their newer waiting changes are forgotten too. The
        forgotten entries are returned, unacknowledged: another replica will read them again.
        """
        gone = [entry for key, entry in self._waiting.items() if drop(key)]
        if not gone:
            return gone
        keys = {entry.key for entry in gone}
        for entry in gone:
            del self._waiting[entry.key]
            self.changes_waiting -= len(entry.tokens)
        self._fresh = deque(key for key in self._fresh if key not in keys)
        self._again = [item for item in self._again if item[1] not in keys]
        heapq.heapify(self._again)
        return gone

    def is_in_flight(self, key: str) -> bool:
        """Whether a request holding ``key`` has not ended yet."""
        return key in self._in_flight
