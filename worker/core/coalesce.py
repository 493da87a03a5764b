"""The coalescer: per-ID merging of waiting changes, at most one request in flight per ID."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import msgspec
import orjson

from worker.core.change import Change, Decoded

Covers = Callable[[str], bool]
"""Which contact IDs a hold covers (None in its place: every ID)."""


class Entry(msgspec.Struct, gc=False):
    """All the waiting changes of one contact, merged field by field into one object to send.

    A msgspec Struct rather than a dataclass: built in C, 16 bytes smaller, and left out of
    the cyclic collector (``gc=False``: it never holds what holds it): 3.5% fewer
    instructions on the first 200,000 changes of the hot path's job (docs/performance.md)."""

    key: str
    body: dict[str, Any] | bytes
    """The object to send: encoded (JSON bytes) while it holds one change, a dict once a
    later change of the ID merged into it. An encoded change takes about 90 bytes where its
    dict and values took about 350, and goes into a request body as it is."""
    held: Any
    """The source's token of each change merged here: the token itself while there is one
    (tokens are hashable, never lists), a list once two merged. :attr:`tokens` and
    :attr:`changes` read it; a list for every entry cost 80 bytes each."""
    seq: int
    """Arrival number of the oldest change merged here: the fairness order."""
    since: float
    """Arrival time of the oldest change merged here: what linger is measured from."""

    @property
    def tokens(self) -> list[Hashable]:
        """The tokens of the changes merged here, oldest first."""
        held = self.held
        return held if type(held) is list else [held]

    @property
    def changes(self) -> int:
        """How many changes were merged here."""
        held = self.held
        return len(held) if type(held) is list else 1

    @property
    def fields(self) -> dict[str, Any]:
        """The object to send, decoded."""
        body = self.body
        return orjson.loads(body) if type(body) is bytes else body  # type: ignore[return-value]


def changes_in(entries: list[Entry]) -> int:
    """How many changes ``entries`` merged in all (one loop, no call per entry)."""
    return len(entries) + sum([len(held) - 1 for e in entries if type(held := e.held) is list])


def all_tokens(entries: Iterable[Entry]) -> list[Hashable]:
    """The tokens of all the changes merged in ``entries``, in order."""
    tokens: list[Hashable] = []
    append, extend = tokens.append, tokens.extend
    for entry in entries:
        held = entry.held
        if type(held) is list:
            extend(held)
        else:
            append(held)
    return tokens


class Coalescer:
    """Holds waiting changes per ID and hands out, oldest first, the IDs that may be sent now.

    An ID is *ready* when it has waiting changes, no request in flight and no hold covering it.
    Changes to an ID in flight keep merging and become ready only when :meth:`release` says the
    older request ended, so per-ID order holds whatever happens to that request. A *hold*
    (:meth:`hold`) keeps the IDs it covers waiting, still merging, until :meth:`unhold`.
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
        self._holds: dict[Hashable, Covers | None] = {}
        self._held: set[str] = set()
        """Waiting IDs, not in flight, that a hold keeps out of the ready queues."""

    def add(self, change: Change, now: float) -> None:
        """Take one valid change; later values win over earlier ones of the same ID."""
        self.add_all([(change.key, change.fields, change.token)], now)

    def add_all(self, changes: list[Decoded], now: float) -> None:
        """Take valid changes in source order; later values win over earlier ones of the
        same ID. One loop for many: the engine's hot path."""
        waiting, in_flight, fresh = self._waiting, self._in_flight, self._fresh
        holds, seq, merged = self._holds, self._seq, 0
        encode, loads = msgspec.json.encode, orjson.loads
        for key, fields, token in changes:
            entry = waiting.get(key)
            if entry is not None:
                body = entry.body
                if type(body) is bytes:
                    entry.body = body = loads(body)
                body.update(fields)  # type: ignore[union-attr]
                held = entry.held
                if type(held) is list:
                    held.append(token)
                else:
                    entry.held = [held, token]
                merged += 1
                continue
            seq += 1
            # Held encoded (Entry.body), by msgspec: its result is allocated to its size
            # (orjson's sits in 4 KiB, which a copy would then have to shrink), and it writes
            # the same bytes as orjson (tests/unit/test_coalesce.py).
            waiting[key] = Entry(key, encode(fields), token, seq, now)
            if key not in in_flight:
                if holds and self.is_held(key):
                    self._held.add(key)
                else:
                    fresh.append(key)
        self._seq = seq
        self.coalesced += merged
        self.changes_waiting += len(changes)

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
        self.changes_waiting -= entry.changes
        return entry

    def pop_many(self, count: int) -> list[Entry]:
        """Take the ``count`` oldest ready entries (at most :attr:`ready_count`), as
        :meth:`pop` would one by one: the batcher's hot path."""
        fresh, again, waiting, in_flight = self._fresh, self._again, self._waiting, self._in_flight
        taken: list[Entry] = []
        append = taken.append
        for _ in range(min(count, len(fresh) + len(again))):
            if again and not (fresh and waiting[fresh[0]].seq < again[0][0]):
                key = heapq.heappop(again)[1]
            else:
                key = fresh.popleft()
            append(waiting.pop(key))
            in_flight.add(key)
        self.changes_waiting -= changes_in(taken)
        return taken

    def release(self, key: str) -> None:
        """The request holding ``key`` ended (applied or dead-lettered): newer changes may go."""
        self.release_many([key])

    def release_many(self, keys: list[str]) -> None:
        """:meth:`release` of each of ``keys``, in order (an applied batch's IDs at once)."""
        self._in_flight.difference_update(keys)
        waiting, holds = self._waiting, self._holds
        for key in [key for key in keys if key in waiting]:
            if holds and self.is_held(key):
                self._held.add(key)
            else:
                heapq.heappush(self._again, (waiting[key].seq, key))

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
            self.changes_waiting -= entry.changes
        self._held -= keys
        self._fresh = deque(key for key in self._fresh if key not in keys)
        self._again = [item for item in self._again if item[1] not in keys]
        heapq.heapify(self._again)
        return gone

    def is_in_flight(self, key: str) -> bool:
        """Whether a request holding ``key`` has not ended yet."""
        return key in self._in_flight

    # -- holds -----------------------------------------------------------------------------

    def hold(self, name: Hashable, covers: Covers | None) -> None:
        """Keep the IDs ``covers`` selects (None: every ID) from being ready until
        :meth:`unhold` of ``name``; their changes keep merging meanwhile."""
        self._holds[name] = covers
        if covers is None:
            moved = set(self._fresh) | {key for _, key in self._again}
        else:
            moved = {key for key in self._fresh if covers(key)}
            moved |= {key for _, key in self._again if covers(key)}
        if not moved:
            return
        self._held |= moved
        self._fresh = deque(key for key in self._fresh if key not in moved)
        self._again = [item for item in self._again if item[1] not in moved]
        heapq.heapify(self._again)

    def unhold(self, name: Hashable) -> int:
        """End the hold ``name``; the IDs no other hold covers become ready, oldest first.
        Returns how many did."""
        if name not in self._holds:
            return 0
        del self._holds[name]
        freed = [key for key in self._held if not self.is_held(key)]
        for key in freed:
            self._held.discard(key)
            heapq.heappush(self._again, (self._waiting[key].seq, key))
        return len(freed)

    def is_held(self, key: str) -> bool:
        """Whether a hold covers ``key``."""
        return any(covers is None or covers(key) for covers in self._holds.values())

    @property
    def holds(self) -> list[Hashable]:
        """The names of the holds in force."""
        return list(self._holds)

    @property
    def ids_held(self) -> int:
        """Waiting IDs that only a hold keeps from being ready."""
        return len(self._held)
