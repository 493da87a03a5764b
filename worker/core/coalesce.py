"""The coalescer: per-ID merging of waiting changes, at most one request in flight per ID."""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import msgspec
import orjson

from worker.core.change import Change, Decoded

Covers = Callable[[str], bool]
"""Which contact IDs a hold covers (None in its place: every ID)."""


READY, HELD, BEHIND, FLYING = 0, 1, 2, 3
"""Where an entry stands (:attr:`Entry.state`): in a ready queue; kept back by a hold; waiting
for a request of its ID still in flight; in a request itself."""


class Entry(msgspec.Struct, gc=False):
    """All the waiting changes of one contact, merged field by field into one object to send.

    A msgspec Struct rather than a dataclass: built in C, 16 bytes smaller, and left out of
    the cyclic collector (``gc=False``: it never holds what holds it): 3.5% fewer
    instructions on the first 200,000 changes of the hot path's job (docs/performance.md)."""

    key: str
    body: dict[str, Any] | bytes
    """The object to send: a dict into which later changes of the ID merge, encoded once,
    when its request is formed; or, while it holds one change, that change encoded (JSON
    bytes), decoded when a second one merges. Which one a new ID's entry holds, the
    coalescer decides from how much the stream merges (:data:`DICT_SHARE`)."""
    held: Any
    """The source's token of the oldest change merged here, or (every token kept, see
    :attr:`Coalescer.keep_tokens`) the list of all of them once two merged: tokens are
    hashable, never lists. :attr:`tokens` reads it."""
    seq: int
    """Arrival number of the oldest change merged here: the fairness order (its token, where
    the tokens are numbers in arrival order: :attr:`Coalescer.tokens_numbered`)."""
    since: float
    """Arrival time of the oldest change merged here: what linger is measured from."""
    changes: int = 1
    """How many changes were merged here: counted as they merge, so that counting a batch's
    changes reads the entries alone (not each one's tokens, elsewhere in memory)."""
    state: int = READY
    """Where it stands in the coalescer: :data:`READY`, :data:`HELD`, :data:`BEHIND` or
    :data:`FLYING` (set by the coalescer alone)."""
    learnt: float = -math.inf
    """When the ID was learnt to exist, as the ID knowledge said when it sorted this entry
    into a batch (minus infinity: not known to exist then). Read back when the batch is
    applied, so that an ID learnt lately costs no second look-up
    (``IdKnowledge.learn_applied``)."""
    last: Any = None
    """The token of the newest change merged here, where the coalescer keeps only the first
    and the last (:attr:`Coalescer.keep_tokens` False); None otherwise."""

    @property
    def tokens(self) -> list[Hashable]:
        """The tokens kept of the changes merged here, oldest first: all of them, or (where
        only the ends are kept) the first and the last; fewer than :attr:`changes` then."""
        held = self.held
        if type(held) is list:
            return held
        return [held] if self.changes == 1 else [held, self.last]

    @property
    def fields(self) -> dict[str, Any]:
        """The object to send: the entry's own dict (not to be changed), or a decoding of
        its bytes."""
        body = self.body
        return orjson.loads(body) if type(body) is bytes else body  # type: ignore[return-value]


_FLYING = Entry("", b"", None, 0, 0.0, 0, FLYING)
"""What stands for a request in flight whose entry the coalescer no longer has (its newer
changes were forgotten): only its state is read."""


DICT_SHARE = 0.3
"""A new ID's change is held as its own dict (the decoded one, which the coalescer then owns)
while at least this share of the changes taken lately merged into a waiting one; encoded
otherwise. A dict spares the encoding of a new ID's change and its decoding at the first
merge (13% of the hot path's pure stages, where half the changes merge), but takes more
memory while it waits alone: a change of three fields 184 bytes and its values against 84
(docs/performance.md). Where changes rarely merge (IDs that turn over), the dict saves
nothing and a window of lone changes would cost 40 MB more at 200,000."""

MERGES_HALF_LIFE = 5_000
"""Changes over which what merged lately halves its weight in the share above."""


def changes_in(entries: list[Entry]) -> int:
    """How many changes ``entries`` merged in all."""
    return sum([e.changes for e in entries])


def all_tokens(entries: Iterable[Entry]) -> list[Hashable]:
    """The tokens of all the changes merged in ``entries``, in order (where every token is
    kept: :attr:`Coalescer.keep_tokens`)."""
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

    One dict holds each ID's entry, waiting or in a request (:attr:`Entry.state` says which),
    and the ready queues hold entries: a change, a pop and a release each look their ID up
    once at most. Memory, not instructions, bounds this path: a backlog of 200,000 IDs does
    not fit in a cache, and each look-up of an ID read long ago waits for memory.
    """

    def __init__(self, dict_share: float = DICT_SHARE) -> None:
        self.dict_share = dict_share
        """New IDs' changes are held as dicts while the share of changes merging lately is
        at least this (0: always; above 1: never)."""
        self._taken = 0.0
        self._merged = 0.0
        """Changes taken and merged lately, each weighed down by :data:`MERGES_HALF_LIFE`."""
        self._ids: dict[str, Entry] = {}
        """Each ID with waiting changes or a request in flight: its newest entry (a waiting
        entry of an ID in flight is :data:`BEHIND` it; the one in flight is not kept then)."""
        # Ready entries in two queues, oldest first: new IDs arrive in seq order, so a plain
        # FIFO holds them; only IDs made ready again by release() need a heap.
        self._fresh: deque[Entry] = deque()
        self._again: list[tuple[int, Entry]] = []
        self._seq = 0
        self._waiting_ids = 0
        self._flying = 0
        self.changes_waiting = 0
        """Changes held here (merged or not): what the source's bound is measured against."""
        self.coalesced = 0
        """Changes merged into an already waiting change of the same ID."""
        self._holds: dict[Hashable, Covers | None] = {}
        self._held: set[str] = set()
        """Waiting IDs, not in flight, that a hold keeps out of the ready queues."""
        self.keep_tokens = True
        """Keep the token of every change merged into an entry (False: only the first and
        the last, :attr:`Entry.last`). An input that acknowledges by count (a file read
        without a checkpoint) needs none of the others: its dead letters name the first and
        the last line and how many merged. Set before the first change."""
        self.tokens_numbered = False
        """The tokens are numbers, increasing in arrival order (a file's line numbers): a
        change's token is its arrival number (:attr:`Entry.seq`), none made for it. Set
        before the first change."""

    def add(self, change: Change, now: float) -> None:
        """Take one valid change; later values win over earlier ones of the same ID."""
        # A copy: an entry may take the dict it is given as its own and merge into it.
        self.add_all([(change.key, dict(change.fields), change.token)], now)

    @property
    def holds_dicts(self) -> bool:
        """Whether a new ID's change is held as its dict now (else encoded): :data:`DICT_SHARE`."""
        if not self._taken:
            return self.dict_share <= 0
        return self._merged >= self.dict_share * self._taken

    def add_all(self, changes: list[Decoded], now: float) -> None:
        """Take valid changes in source order; later values win over earlier ones of the
        same ID. One loop for many: the engine's hot path. The entry of a new ID may take
        the change's dict as its own (later changes merge into it): ``changes`` are handed
        over, as :func:`~worker.core.change.decode_all` makes them, not shared."""
        ids, fresh, holds = self._ids, self._fresh, self._holds
        seq, merged, new = self._seq, 0, 0
        keep, numbered = self.keep_tokens, self.tokens_numbered
        # Encoded by msgspec: its result is allocated to its size (orjson's sits in 4 KiB,
        # which a copy would then have to shrink), the same bytes as orjson's.
        encode = None if self.holds_dicts else msgspec.json.encode
        loads = orjson.loads
        for key, fields, token in changes:
            entry = ids.get(key)
            if entry is not None and entry.state != FLYING:
                body = entry.body
                if type(body) is bytes:
                    entry.body = body = loads(body)
                body.update(fields)  # type: ignore[union-attr]
                if not keep:
                    entry.last = token
                elif entry.changes == 1:
                    entry.held = [entry.held, token]
                else:
                    entry.held.append(token)
                entry.changes += 1
                merged += 1
                continue
            seq = token if numbered else seq + 1  # type: ignore[assignment]  # a number then
            new += 1
            held = fields if encode is None else encode(fields)
            if entry is not None:  # its ID is in flight: it waits behind that request
                ids[key] = Entry(key, held, token, seq, now, 1, BEHIND)
            elif holds and self.is_held(key):
                ids[key] = Entry(key, held, token, seq, now, 1, HELD)
                self._held.add(key)
            else:
                ids[key] = entry = Entry(key, held, token, seq, now, 1, READY)
                fresh.append(entry)
        self._seq = seq
        weight = 0.5 ** (len(changes) / MERGES_HALF_LIFE)
        self._taken = self._taken * weight + len(changes)
        self._merged = self._merged * weight + merged
        self._waiting_ids += new
        self.coalesced += merged
        self.changes_waiting += len(changes)

    @property
    def ready_count(self) -> int:
        """How many IDs could be put in a request right now."""
        return len(self._fresh) + len(self._again)

    @property
    def ids_waiting(self) -> int:
        """How many IDs have waiting changes (in flight or not)."""
        return self._waiting_ids

    @property
    def ids_in_flight(self) -> int:
        """How many IDs are in a request that has not ended."""
        return self._flying

    def peek(self) -> Entry | None:
        """The ready entry with the oldest waiting change, left in place."""
        fresh, again = self._fresh, self._again
        if not again:
            return fresh[0] if fresh else None
        if fresh and fresh[0].seq < again[0][0]:
            return fresh[0]
        return again[0][1]

    def pop(self) -> Entry:
        """Take the oldest ready entry; its ID is in flight until :meth:`release`."""
        return self.pop_many(1)[0]

    def pop_many(self, count: int) -> list[Entry]:
        """Take the ``count`` oldest ready entries (at most :attr:`ready_count`), as
        :meth:`pop` would one by one: the batcher's hot path (no look-up: the queues hold
        the entries, which stay in the dict as the IDs' requests in flight)."""
        fresh, again = self._fresh, self._again
        taken: list[Entry] = []
        append, popleft, heappop = taken.append, fresh.popleft, heapq.heappop
        for _ in range(min(count, len(fresh) + len(again))):
            if again and not (fresh and fresh[0].seq < again[0][0]):
                append(heappop(again)[1])
            else:
                append(popleft())
        changes = 0
        for entry in taken:
            entry.state = FLYING
            changes += entry.changes
        self._waiting_ids -= len(taken)
        self._flying += len(taken)
        self.changes_waiting -= changes
        return taken

    def release(self, key: str) -> None:
        """The request holding ``key`` ended (applied or dead-lettered): newer changes may go."""
        self.release_many([key])

    def release_many(self, keys: list[str]) -> None:
        """:meth:`release` of each of ``keys``, in order (an applied batch's IDs at once)."""
        ids, holds, again = self._ids, self._holds, self._again
        released = 0
        for key in keys:
            entry = ids.get(key)
            if entry is None:
                continue
            state = entry.state
            if state == FLYING:
                del ids[key]
            elif state == BEHIND:
                if holds and self.is_held(key):
                    entry.state = HELD
                    self._held.add(key)
                else:
                    entry.state = READY
                    heapq.heappush(again, (entry.seq, entry))
            else:
                continue  # not in flight: nothing to end
            released += 1
        self._flying -= released

    def forget(self, drop: Callable[[str], bool]) -> list[Entry]:
        """Remove the waiting changes of the IDs ``drop`` selects (a partition this replica lost).

        Requests in flight are not touched; their newer waiting changes are forgotten too. The
        forgotten entries are returned, unacknowledged: another replica will read them again.
        """
        ids = self._ids
        gone = [entry for key, entry in ids.items() if entry.state != FLYING and drop(key)]
        if not gone:
            return gone
        keys = {entry.key for entry in gone}
        for entry in gone:
            if entry.state == BEHIND:
                ids[entry.key] = _FLYING  # its request is still in flight
            else:
                del ids[entry.key]
            self.changes_waiting -= entry.changes
        self._waiting_ids -= len(gone)
        self._held -= keys
        self._unqueue(keys)
        return gone

    def _unqueue(self, keys: set[str]) -> None:
        """Take the entries of ``keys`` out of the ready queues, the others keeping their order."""
        self._fresh = deque(entry for entry in self._fresh if entry.key not in keys)
        self._again = [item for item in self._again if item[1].key not in keys]
        heapq.heapify(self._again)

    def is_in_flight(self, key: str) -> bool:
        """Whether a request holding ``key`` has not ended yet."""
        entry = self._ids.get(key)
        return entry is not None and entry.state >= BEHIND

    # -- holds -----------------------------------------------------------------------------

    def hold(self, name: Hashable, covers: Covers | None) -> None:
        """Keep the IDs ``covers`` selects (None: every ID) from being ready until
        :meth:`unhold` of ``name``; their changes keep merging meanwhile."""
        self._holds[name] = covers
        ready = [*self._fresh, *(entry for _, entry in self._again)]
        moved = ready if covers is None else [entry for entry in ready if covers(entry.key)]
        if not moved:
            return
        for entry in moved:
            entry.state = HELD
        keys = {entry.key for entry in moved}
        self._held |= keys
        self._unqueue(keys)

    def unhold(self, name: Hashable) -> int:
        """End the hold ``name``; the IDs no other hold covers become ready, oldest first.
        Returns how many did."""
        if name not in self._holds:
            return 0
        del self._holds[name]
        freed = [key for key in self._held if not self.is_held(key)]
        for key in freed:
            self._held.discard(key)
            entry = self._ids[key]
            entry.state = READY
            heapq.heappush(self._again, (entry.seq, entry))
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
