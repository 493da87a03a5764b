"""ID knowledge: what the API said about each ID, kept for a while (DESIGN 11).

Two facts are kept per ID, each with the time it was learnt: *exists* (a request holding it was
applied) and *missing* (it was dead-lettered ``not_found`` on a confirmed answer). They are a
prior, not a promise: the API's contacts change, so every fact expires after its time-to-live,
and a newer answer replaces an older one. The scheduler composes batches from them:

* IDs known to exist go together (they almost never fail);
* IDs known missing are dead-lettered at once, citing the earlier answer, without a request:
  sending them alone would cost a request each for an answer already given;
* fresh IDs go in groups sized for the unknown share (``worker.core.grouptest``).

Size is bounded: beyond ``max_ids`` per fact, the oldest learnt is forgotten first. Pure: time
comes in as ``now``; nothing here does I/O.
"""

from __future__ import annotations

import enum
import math
from collections.abc import MutableSequence, Sequence
from dataclasses import dataclass, field
from itertools import islice, repeat
from typing import Protocol, TypeVar

MOVE_AFTER = 0.25
"""A fact learnt again is learnt anew (its time moves on, and it moves to the end of its kind's
order, which the bound drops from the front) only when it was learnt more than this share of
the TTL ago; learnt more lately, it is left as it is. So the order stays the order of the times
learnt (the bound drops exactly the oldest), and an ID applied again and again costs nothing
until then; such a fact may expire a quarter of the TTL early (at least 0.75 of the TTL after
the last request that applied it). Learning each one anew churned the dict and kept each ID's
newest string alive (scattered through memory) instead of the one held: 7 to 14 MB of peak RSS
at 200,000 IDs."""


class Keyed(Protocol):
    """Anything with a contact ID (a coalescer entry), and room for when it was learnt to
    exist (:meth:`IdKnowledge.sort` writes it)."""

    @property
    def key(self) -> str: ...

    learnt: float


K = TypeVar("K", bound=Keyed)


class Known(enum.Enum):
    """What is known about one ID."""

    EXISTS = "exists"
    MISSING = "missing"


@dataclass(frozen=True, slots=True)
class Fact:
    """One fact about one ID: what, and when it was learnt (the scheduler's clock)."""

    known: Known
    learnt_at: float


@dataclass(slots=True)
class KnowledgeStats:
    """Look-ups answered from knowledge (hits, by fact) and not (misses)."""

    hits: dict[str, int] = field(default_factory=lambda: {k.value: 0 for k in Known})
    misses: int = 0
    forgotten: int = 0
    """Facts dropped because the size bound was reached."""


class IdKnowledge:
    """The facts learnt from the API, each kept ``ttl_s``, at most ``max_ids`` of each kind.

    One plain dict per kind, ID -> when learnt, in learning order (a fact learnt again moves to
    the end; learnt lately, left as it is: :data:`MOVE_AFTER`): about 40 bytes per ID beside the
    ID's string (about 55).
    The size bound is kept in bulk: past ``max_ids`` plus a tenth, the oldest learnt are dropped
    down to ``max_ids`` in one pass (a constant cost per fact learnt).
    """

    def __init__(self, ttl_s: float = 900.0, max_ids: int = 100_000) -> None:
        if max_ids < 0 or ttl_s < 0:
            raise ValueError("ttl_s and max_ids must be >= 0")
        self.ttl_s = ttl_s
        self.max_ids = max_ids
        self._exists: dict[str, float] = {}
        self._missing: dict[str, float] = {}
        self._facts: dict[Known, dict[str, float]] = {
            Known.EXISTS: self._exists,
            Known.MISSING: self._missing,
        }
        self._slack = max_ids // 10
        self.stats = KnowledgeStats()
        self._journal: list[tuple[str, Known, float]] | None = None

    def keep_journal(self) -> None:
        """From now on, remember each fact the API taught until :meth:`drain` (for a store)."""
        if self._journal is None:
            self._journal = []

    def drain(self) -> list[tuple[str, Known, float]]:
        """The facts learnt from the API since the last drain: (ID, fact, when learnt)."""
        journal = self._journal
        if not journal:
            return []
        self._journal = []
        return journal

    def __len__(self) -> int:
        return len(self._exists) + len(self._missing)

    def count(self, known: Known) -> int:
        """How many facts of one kind are held (expired ones included until looked up)."""
        return len(self._facts[known])

    def lookup(self, key: str, now: float) -> Fact | None:
        """The live fact about ``key``, if any; counts a hit or a miss."""
        fact = self.peek(key, now)
        if fact is None:
            self.stats.misses += 1
        else:
            self.stats.hits[fact.known.value] += 1
        return fact

    def sort(
        self,
        items: Sequence[K],
        now: float,
        fresh: MutableSequence[K],
        existing: MutableSequence[K],
    ) -> list[tuple[K, Fact]]:
        """Sort ``items`` by what is known of their keys, counting hits and misses as
        :meth:`lookup` does: onto ``fresh`` (nothing known) or ``existing`` (known to exist),
        in order; those known missing are returned, with their fact. The batcher's hot path:
        one loop, no :class:`Fact` but for the missing. An item known to exist is told when
        that was learnt (``item.learnt``), for :meth:`learn_applied`."""
        exists, missing, ttl = self._exists, self._missing, self.ttl_s
        to_fresh, to_existing = fresh.append, existing.append
        found: list[tuple[K, Fact]] = []
        hits = 0
        for item in items:
            key = item.key
            learnt = exists.get(key)
            if learnt is not None:
                if learnt + ttl > now:
                    item.learnt = learnt
                    to_existing(item)
                    hits += 1
                    continue
                del exists[key]
            if missing:
                fact = self.peek(key, now)
                if fact is not None:
                    found.append((item, fact))
                    continue
            to_fresh(item)
        stats = self.stats
        stats.hits[Known.EXISTS.value] += hits
        stats.hits[Known.MISSING.value] += len(found)
        stats.misses += len(items) - hits - len(found)
        return found

    def peek(self, key: str, now: float) -> Fact | None:
        """The live fact about ``key`` without counting; expired facts are dropped."""
        learnt = self._exists.get(key)
        if learnt is not None:
            if learnt + self.ttl_s > now:
                return Fact(Known.EXISTS, learnt)
            del self._exists[key]
        if self._missing:
            learnt = self._missing.get(key)
            if learnt is not None:
                if learnt + self.ttl_s > now:
                    return Fact(Known.MISSING, learnt)
                del self._missing[key]
        return None

    def learn(self, key: str, known: Known, now: float, *, journal: bool = True) -> None:
        """The API told ``known`` about ``key`` at ``now``: it replaces whatever was known.

        ``journal=False``: a fact loaded from a store, not to be written back."""
        if not self.max_ids or not self.ttl_s:
            return
        if journal and self._journal is not None:
            self._journal.append((key, known, now))
            self._bound_journal(self._journal)
        if known is Known.EXISTS:
            facts, other = self._exists, self._missing
        else:
            facts, other = self._missing, self._exists
        if other:
            other.pop(key, None)
        facts.pop(key, None)  # learnt again: to the end, the newest
        facts[key] = now
        if len(facts) > self.max_ids + self._slack:
            self._bound(known)

    def learn_applied(
        self, keys: list[str], now: float, seen: Sequence[float] | None = None
    ) -> int:
        """The API applied requests holding ``keys`` at ``now``: each is known to exist.
        Returns how many were not known to exist before (fresh, or known missing).

        ``seen``, beside ``keys``: when :meth:`sort` found each learnt to exist (minus
        infinity: it did not). A key it found learnt within :data:`MOVE_AFTER` of the TTL is
        left as it is without a look-up: its fact would be left as it is anyway. That saves
        the batch's second look-up of each ID in a dict too large for the caches (12% of the
        hot path's pure CPU went to the ID knowledge). Should the size bound have dropped
        such a fact meanwhile (it drops the oldest learnt first), the ID is fresh again the
        next time it is sorted."""
        if not self.max_ids or not self.ttl_s:
            return len(keys)
        exists, missing, ttl = self._exists, self._missing, self.ttl_s
        journal = self._journal
        fresh = 0
        get, moved_before = exists.get, now - ttl * MOVE_AFTER
        # What sort saw is trusted from ``moved_before`` on; never when that is minus
        # infinity (an infinite TTL), where "not known" (minus infinity) would pass too.
        trusted_from = moved_before if moved_before > -math.inf else math.inf
        for key, known in zip(keys, seen or repeat(-math.inf, len(keys)), strict=True):
            if known >= trusted_from:
                continue  # learnt lately when its batch formed: left as it is
            learnt = get(key)
            if learnt is None:
                fresh += 1
            elif learnt >= moved_before:
                continue  # learnt lately: left as it is, its time and its place
            else:
                if learnt + ttl <= now:
                    fresh += 1
                del exists[key]  # to the end: the bound drops the oldest learnt first
            exists[key] = now
        if missing:
            for key in keys:
                missing.pop(key, None)
        if journal is not None:
            journal.extend((key, Known.EXISTS, now) for key in keys)
            self._bound_journal(journal)
        if len(exists) > self.max_ids + self._slack:
            self._bound(Known.EXISTS)
        return fresh

    def _bound_journal(self, journal: list[tuple[str, Known, float]]) -> None:
        """A store away for long: keep the newest facts, at most ``max_ids`` plus a tenth,
        trimmed in bulk like the facts themselves. Trimmed back to ``max_ids`` at every call
        instead, a full journal of 200,000 was moved in memory for each request applied
        (31 µs a time, against 1.9 µs in bulk, measured alone)."""
        if len(journal) > self.max_ids + self._slack:
            del journal[: len(journal) - self.max_ids]

    def _bound(self, known: Known) -> None:
        """Drop the oldest learnt facts of one kind down to ``max_ids``: from the front of its
        dict, in place (the dict is in learning order). Rebuilding the dict instead copied all
        of it each time: with IDs that turn over (more IDs than ``max_ids``), a third of the
        hot path's CPU (docs/performance.md)."""
        facts = self._facts[known]
        over = len(facts) - self.max_ids
        if over <= 0:
            return
        for key in list(islice(facts, over)):
            del facts[key]
        self.stats.forgotten += over

    def forget(self, key: str) -> None:
        """Drop every fact about ``key``."""
        for facts in self._facts.values():
            facts.pop(key, None)

    def clear(self) -> None:
        """Forget everything."""
        for facts in self._facts.values():
            facts.clear()
