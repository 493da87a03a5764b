"""The scheduler: the whole pure decision state between the source and the senders.

It owns the coalescer, the batcher's policy, the isolation plans, retries and backoff. The
engine only asks it for the next batch to send and tells it how each request ended; what to
acknowledge and what to dead-letter comes back as a :class:`Settled`. Time comes in as ``now``.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Hashable, MutableSequence
from dataclasses import dataclass, field

from worker.core.backoff import Backoff
from worker.core.batch import Batch, BatchLimits, Purpose, flush_due, pack
from worker.core.change import Change, Decoded
from worker.core.classify import Action, Verdict
from worker.core.coalesce import Coalescer, Covers, Entry, changes_in
from worker.core.grouptest import UnknownShare, fresh_riders, group_size
from worker.core.knowledge import Fact, IdKnowledge, Known
from worker.core.split import DeadLetter, culprit, halves, release_held, split_known_bad

DEFAULT_MAX_WAITING = 200_000
"""Changes held in memory by default before reading pauses: a backlog up to this size coalesces
per ID in full when the API's rate is what limits (about 330 bytes per change held, 66 MB
at 200,000 changes over 126,000 IDs from a file; 360 with every token kept, from a broker:
docs/performance.md)."""


REPLAY_ALLOWANCE = 2
"""While a replay range is held, reading goes on up to this many times max-waiting before
sending must start: the range is what the crashed run held (its waiting changes, and those in
flight or not yet acknowledged), a little more than max-waiting when it was full."""


READ_AHEAD_S = 5.0
"""Longest a readable backlog holds back sending (``SchedulerSettings.read_ahead_s``): reading
a full --max-waiting of 200,000 changes takes about 2 s here."""


READ_STALL_S = 0.5
"""A read-ahead ends when the reader took nothing in for this long: the input that said it had
more is waiting for more after all (its last page was full and the next one empty). Taking in
a slice takes about 10 ms; on a busy machine the gaps between slices reach 100 ms."""


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    """Everything the scheduler decides with."""

    limits: BatchLimits = BatchLimits()
    backoff: Backoff = Backoff()
    max_waiting: int = DEFAULT_MAX_WAITING
    """Changes held before the source is slowed down."""
    suspect_ttl_s: float = 900.0
    """How long what the API said about an ID (it exists, it is missing) is remembered."""
    max_suspects: int = 200_000
    """The most IDs remembered of each kind (exists, missing): the oldest go first."""
    max_retries: int = 0
    """Transient failures of one request before giving up (fatal); 0 = never give up."""
    confirm_tries: int = 3
    """Identical answers with an undocumented error code a lone change needs before it is
    dead-lettered ``rejected`` (retried with backoff in between; a group is retried once
    before it is split)."""
    max_not_found_run: int = 10
    """Lone contacts answered 404 in a row, with no request applied in between, at which the
    404s are taken for a wrong URL or a wrong account and sending stops (0 = never)."""
    max_contradictions: int = 3
    """Lone 404s in a row (nothing applied in between) on IDs the API applied within
    ``recent_s`` at which the 404s are taken for answers not about IDs (a wrong account behind
    the URL) and sending stops (0 = never)."""
    recent_s: float = 3600.0
    """How recently an ID must have been applied for a lone 404 on it to contradict (the
    "exists" fact must also still be known: ``suspect_ttl_s`` bounds it in practice)."""
    timeout_grace_s: float = 60.0
    """After a request was abandoned (timeout, connection lost after sending) the API may
    still apply it: its IDs take no newer values until this long after it was abandoned."""
    read_ahead_s: float = READ_AHEAD_S
    """Longest the oldest ready change waits, while the input's backlog is read ahead, before
    batches leave anyway (an input slower to read than this is not held up for it)."""
    read_stall_s: float = READ_STALL_S
    """A read-ahead ends when the reader took nothing in for this long."""


ODD_NOISE_ODDS = 1e-6
"""Chance at which noise may repeat an undocumented answer on a lone change as often as the
tries it needs: what a false ``rejected`` may cost at most."""
MAX_CONFIRM_TRIES = 20


class OddAnswers:
    """How often each undocumented answer came again when its request was sent again: noise
    that a lone change must outlast before the answer is taken for a verdict.

    An answer that a retry repeats a share ``p`` of the time (and contradicts otherwise)
    repeats ``k - 1`` more times by chance with odds ``p ** (k - 1)``; a lone change needs
    enough identical answers for that to fall below :data:`ODD_NOISE_ODDS` (at least
    ``confirm_tries``, at most 20). An answer no retry ever contradicted is a verdict after
    ``confirm_tries``.
    """

    def __init__(self) -> None:
        self._repeated: Counter[tuple[int | None, str | None]] = Counter()
        self._contradicted: Counter[tuple[int | None, str | None]] = Counter()

    def answered(self, previous: tuple[int | None, str | None], verdict: Verdict) -> None:
        """A request that got ``previous`` before was answered ``verdict`` now."""
        if (verdict.status, verdict.error) == previous:
            self._repeated[previous] += 1
        else:
            self._contradicted[previous] += 1

    def tries(self, answer: tuple[int | None, str | None], least: int) -> int:
        """Identical answers a lone change needs before ``answer`` is taken for a verdict."""
        contradicted = self._contradicted[answer]
        if not contradicted:
            return least
        repeats = self._repeated[answer] / (contradicted + self._repeated[answer])
        if repeats <= 0.0:
            return least
        needed = 1 + math.ceil(math.log(ODD_NOISE_ODDS) / math.log(repeats))
        return max(least, min(MAX_CONFIRM_TRIES, needed))


@dataclass(slots=True)
class Settled:
    """What the engine must carry out after a request ended."""

    applied: list[Entry] = field(default_factory=list)
    applied_changes: int = 0
    """How many changes ``applied`` merged in all (counted once, where they settle)."""
    dead: list[DeadLetter] = field(default_factory=list)
    fatal: Verdict | None = None
    retry_in_s: float | None = None


@dataclass(slots=True)
class Replay:
    """A replay range the source is reading (DESIGN 9): what may have been read before a crash.

    The IDs it covers are held (not sent) until the source has handed the whole range out, so
    that every change of the range is coalesced per ID before any of it is sent again.
    """

    name: Hashable
    covers: Covers | None
    """The IDs of the range (None: every ID)."""
    since: float
    changes: int = 0
    """Changes to covered IDs taken in while the range was held."""


@dataclass(frozen=True, slots=True)
class ReplayEnd:
    """How a replay range's hold ended."""

    name: Hashable
    changes: int
    ids: int
    """IDs that the end of the hold made ready."""
    held_s: float
    complete: bool
    """False when the hold ended before the whole range was read (the replay allowance of
    max-waiting was reached)."""


@dataclass(slots=True)
class SchedulerStats:
    """Counters kept as decisions are made; the engine's summary and metrics read them."""

    changes: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    requests_by_purpose: Counter[str] = field(default_factory=Counter)
    contacts_applied: int = 0
    changes_applied: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)
    """Changes dead-lettered, by reason."""
    dead_entries: Counter[str] = field(default_factory=Counter)
    """Dead letters written (one per coalesced entry), by reason."""
    inferred_culprits: int = 0
    retries: int = 0
    shrinks: int = 0
    confirmations: int = 0
    """Lone changes re-sent to confirm an answer with an undocumented error code."""
    fenced: int = 0
    """IDs held back from newer values after a request of theirs was abandoned."""
    known_missing: int = 0
    """Entries dead-lettered without a request: their IDs were known missing."""
    contradictions: int = 0
    """Lone 404s on IDs the API had applied recently."""
    riders: int = 0
    """Entries that went with a search step as riders (counted each time they rode)."""

    @property
    def isolation_requests(self) -> int:
        """Requests spent on finding culprits rather than on new work."""
        return self.requests_by_purpose["isolate"] + self.requests_by_purpose["suspect"]


class Scheduler:
    """Decides which changes go in which request, and what a request's outcome means."""

    def __init__(
        self,
        settings: SchedulerSettings | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings or SchedulerSettings()
        self.coalescer = Coalescer()
        self.stats = SchedulerStats()
        self.ceiling = self.settings.limits.max_items
        """The most entries per request; lowered when the API answers 413."""
        self.draining = False
        """Flush everything without waiting for linger (end of input or shutdown)."""
        self._reading_ahead = False
        self._merged_before = 0
        """Changes merged (coalesced) before the backlog being read ahead began."""
        self._read_at = 0.0
        """When records were last taken in (a reader that stalls ends the read-ahead)."""
        self.paused_until = 0.0
        """No request before this time: the API asked everybody to wait (Retry-After)."""
        self.fatal: Verdict | None = None
        self._rand = rand
        self._urgent: deque[Batch] = deque()
        self._delayed: list[tuple[float, int, Batch]] = []
        self._outstanding = 0
        self._numbers = 0
        self.knowledge = IdKnowledge(self.settings.suspect_ttl_s, self.settings.max_suspects)
        """What the API said about IDs: batches are composed from it."""
        self.unknown_share = UnknownShare()
        """The share of fresh IDs found missing: it sizes their groups."""
        self._missing_ahead = 0
        """Missing IDs counted in the share when their searches began, not found yet."""
        self._fresh: deque[Entry] = deque()
        """Taken from the coalescer (or returned by a search) and not sent yet: IDs nothing is
        known about. They go in groups sized for the unknown share."""
        self._existing: deque[Entry] = deque()
        """Taken and not sent yet: IDs known to exist. They go together."""
        self._known_missing: list[DeadLetter] = []
        """IDs known missing, dead-lettered without a request (by :meth:`settle_due`)."""
        self._unconfirmed: list[tuple[DeadLetter, float | None]] = []
        self._lone_run = 0
        """Lone verdicts since the last applied request, written or not: the run."""
        self._contradiction_run = 0
        """Lone 404s in a row that contradicted what was known (the ID was applied lately)."""
        """Lone 404s since the last applied request: dead-lettered once a 2xx shows the API
        answers (or nothing is left to send), dropped unwritten if the run turns fatal."""
        self._fences: list[tuple[float, str]] = []
        self._fenced: dict[str, Entry | None] = {}
        """Fenced IDs, and the entry applied by the request that settled them: acknowledged
        only when the fence lifts, so that a partition holding it is not handed over while
        the abandoned request may still be applied (None: dead-lettered, nothing to ack)."""
        self._lifted: list[Entry] = []
        self._replays: dict[Hashable, Replay] = {}
        self._odd = OddAnswers()

    # -- input -----------------------------------------------------------------------------

    def add(self, change: Change, now: float) -> None:
        """Take one valid change from the source."""
        # A copy: the coalescer takes the dict it is given as its own and merges into it.
        self.add_all([(change.key, dict(change.fields), change.token)], now)

    def add_all(self, changes: list[Decoded], now: float) -> None:
        """Take valid changes from the source, in its order."""
        self.stats.changes += len(changes)
        if self._replays:
            for key, _, _ in changes:
                self._count_replayed(key)
        self.coalescer.add_all(changes, now)

    @property
    def has_room(self) -> bool:
        """Whether the source may hand over more changes."""
        return self.coalescer.changes_waiting < self.settings.max_waiting

    @property
    def may_read(self) -> bool:
        """Whether the source may hand over more changes: while there is room, or while a
        replay range is held, up to REPLAY_ALLOWANCE times max-waiting."""
        limit = self.settings.max_waiting
        if self._replays:
            limit *= REPLAY_ALLOWANCE
        return self.coalescer.changes_waiting < limit

    @property
    def idle(self) -> bool:
        """Nothing waiting, nothing in a request, nothing to retry."""
        return (
            self.coalescer.ids_waiting == 0
            and self._outstanding == 0
            and not self._urgent
            and not self._delayed
            and not self._unconfirmed
            and not self._lifted
            and not self._fresh
            and not self._existing
            and not self._known_missing
            and not any(entry is not None for entry in self._fenced.values())
        )

    @property
    def reading_ahead(self) -> bool:
        """The input holds a backlog readable now (told by :meth:`read_ahead`): new batches
        wait until it is read, or the scheduler is full, so that an ID's later changes in it
        merge into its request instead of following in another (:meth:`_read_ahead_until`)."""
        return self._reading_ahead

    def read_ahead(self, more: bool, now: float) -> bool:
        """The engine takes records in (a slice of a read) at ``now``; ``more``: whether the
        input has more readable now. True when the read-ahead ended with this call (senders
        waiting for it may go)."""
        if more and not self._reading_ahead:
            self._merged_before = self.coalescer.coalesced
        ended = self._reading_ahead and not more
        self._reading_ahead = more
        self._read_at = now
        return ended

    @property
    def outstanding(self) -> int:
        """Requests handed out and not resolved yet."""
        return self._outstanding

    @property
    def retrying(self) -> int:
        """Requests waiting for their backoff to end."""
        return len(self._delayed)

    # -- output ----------------------------------------------------------------------------

    def next_batch(self, now: float) -> Batch | float | None:
        """The next request to send; else when to ask again (None: when something changes)."""
        if self.fatal is not None:
            return None
        if now < self.paused_until:
            return self.paused_until
        fence_due = self._lift_fences(now)
        if self._urgent:
            return self._hand_out(self._top_up(self._urgent.popleft(), now))
        if self._delayed and self._delayed[0][0] <= now:
            return self._hand_out(heapq.heappop(self._delayed)[2])
        # A full scheduler flushes at once: waiting out linger would only stall the source.
        hurry = self.draining or not self.has_room
        if self.reading_ahead and not hurry:
            held_until = self._read_ahead_until(now)
            if held_until is not None:
                return self._sooner(held_until, fence_due)
        due = flush_due(self.coalescer, self.settings.limits, self.ceiling, now, hurry)
        if due is None and (self._fresh or self._existing):
            due = True  # nothing more to wait for: what was taken goes now
        elif due is not True and self._group_full():
            due = True
        if due is True:
            batch = self._form(now)
            if batch is not None:
                return self._hand_out(batch)
            due = None
        if self._known_missing:
            return now  # dead letters to settle: ask again at once
        return self._sooner(None if due is True else due, fence_due)

    def _sooner(self, wake: float | None, fence_due: float | None) -> float | None:
        """The earliest of ``wake``, the next retry and the next fence's end."""
        for first in (self._delayed[0][0] if self._delayed else None, fence_due):
            if first is not None:
                wake = first if wake is None else min(wake, first)
        return wake

    def _read_ahead_until(self, now: float) -> float | None:
        """While the input's backlog is read ahead: until when new batches wait (None: they
        need not). Sending an ID now would send it again for each later change of it in the
        backlog; when the rate or the concurrency binds, the requests are what a drain costs,
        and reading is many times faster than sending, so reading first costs next to no time.
        The wait ends when the backlog is read, when the scheduler is full (memory stays within
        --max-waiting), when the reader took nothing in for ``read_stall_s`` (an input that
        said it had more and then waited), or after ``read_ahead_s``. It does not begin while
        nothing read of the backlog so far merged into a waiting change (IDs that do not
        repeat, where reading ahead would save nothing and leave the senders idle)."""
        coalescer = self.coalescer
        oldest = coalescer.peek()
        if oldest is None or coalescer.coalesced == self._merged_before:
            return None
        settings = self.settings
        until = min(oldest.since + settings.read_ahead_s, self._read_at + settings.read_stall_s)
        return until if now < until else None

    def _lift_fences(self, now: float) -> float | None:
        """Let newer changes of IDs whose grace has passed go, and their applied entries be
        acknowledged (by :meth:`settle_due`); when the next fence ends."""
        fences = self._fences
        while fences and fences[0][0] <= now:
            key = heapq.heappop(fences)[1]
            self.coalescer.release(key)
            entry = self._fenced.pop(key, None)
            if entry is not None:
                self._lifted.append(entry)
        return fences[0][0] if fences else None

    def drop_fenced(self) -> list[Entry]:
        """On shutdown: forget the waiting changes of fenced IDs (unacknowledged, read again
        at the next start) instead of waiting out their grace; acknowledge what their
        requests applied now (by :meth:`settle_due`). The changes forgotten."""
        if not self._fences:
            return []
        self._ack_fenced_now()
        fenced = {key for _, key in self._fences}
        return self.coalescer.forget(fenced.__contains__)

    def _ack_fenced_now(self) -> None:
        """Acknowledge what fenced requests applied without waiting for their fences (the
        IDs stay fenced): nothing will be handed over to another replica any more."""
        for key, entry in self._fenced.items():
            if entry is not None:
                self._lifted.append(entry)
                self._fenced[key] = None

    def settle_due(self, now: float) -> Settled | None:
        """What is settled without an answer; the engine asks before each batch it takes.

        The entries whose fence lifted are acknowledged (all of them once the input is
        drained: no partition is handed over any more). The lone 404s held for a 2xx become
        dead letters once nothing is left that could bring one: no request out, none to retry,
        no change ready. They stay in the run all the same (only a 2xx ends it), so a slow
        trickle of them still reaches the run's limit and stops.
        """
        self._lift_fences(now)
        if self.draining:
            self._ack_fenced_now()
        settled = None
        if self._lifted:
            settled = Settled(applied=self._lifted, applied_changes=changes_in(self._lifted))
            self._lifted = []
        if self._known_missing and self.fatal is None:
            settled = settled or Settled()
            known, self._known_missing = self._known_missing, []
            self._dead(known, now, settled, learn=False)
        if not self._unconfirmed or self.fatal is not None:
            return settled
        if self._outstanding or self._urgent or self._delayed or self._fresh or self._existing:
            return settled
        if self.coalescer.ready_count or self.coalescer.ids_held:
            return settled
        settled = settled or Settled()
        self._confirm_lone(now, settled)
        return settled

    @property
    def ids_answered(self) -> int:
        """IDs still "in flight" for the coalescer whose requests the API has answered: lone
        404s held for a 2xx (not applied, whatever comes). Nothing of theirs can still change
        at the API, so a partition holding them may be handed over."""
        return sum(1 for _, fence_until in self._unconfirmed if fence_until is None)

    def _hand_out(self, batch: Batch) -> Batch:
        self._outstanding += 1
        self.stats.requests_by_purpose[batch.purpose.value] += 1
        return batch

    def _number(self) -> int:
        self._numbers += 1
        return self._numbers

    @property
    def group(self) -> int:
        """How many fresh IDs go in one request now: Hwang's size for the unknown share."""
        return group_size(self.unknown_share.share, self.ceiling)

    def _group_full(self) -> bool:
        return len(self._existing) >= self.ceiling or len(self._fresh) >= self.group

    def _form(self, now: float) -> Batch | None:
        """Sort ready entries by what is known of their IDs, then pack one request: a full
        group of IDs known to exist, else a group of fresh IDs topped up with IDs known to
        exist, else what there is."""
        while not self._group_full():
            # As many as neither pool can overflow with, in one take.
            room = min(self.ceiling - len(self._existing), self.group - len(self._fresh))
            if not self._take_in(room, now):
                break
        limit = self.ceiling
        if len(self._existing) >= limit or not self._fresh:
            entries, fresh = _take(self._existing, limit), 0
        else:
            entries = _take(self._fresh, self.group)
            fresh = len(entries)
            entries += _take(self._existing, limit - fresh)
        if not entries:
            return None
        kept, body = pack(entries, self.settings.limits.max_bytes)
        for index in range(len(entries) - 1, len(kept) - 1, -1):  # back in front, in order
            (self._fresh if index < fresh else self._existing).appendleft(entries[index])
        return Batch(kept, self._number(), encoded=body)

    def _take_in(
        self,
        count: int,
        now: float,
        fresh: MutableSequence[Entry] | None = None,
        existing: MutableSequence[Entry] | None = None,
    ) -> int:
        """Take up to ``count`` ready entries from the coalescer onto ``fresh`` and
        ``existing`` (the pools unless given), sorted by what is known of their IDs (known
        missing: dead-lettered without a request); how many were taken."""
        taken = self.coalescer.pop_many(count)
        fresh = self._fresh if fresh is None else fresh
        existing = self._existing if existing is None else existing
        for entry, fact in self.knowledge.sort(taken, now, fresh, existing):
            self._known_missing.append(self._known_missing_letter(entry, fact, now))
            self.stats.known_missing += 1
        return len(taken)

    def _top_up(self, batch: Batch, now: float) -> Batch:
        """A search step leaves with riders (``worker.core.split``): IDs known to exist, up to
        the ceiling, then fresh IDs from the coalescer when the share is low enough for them
        (:func:`~worker.core.grouptest.fresh_riders`) and a batch could be formed now. Applied,
        its request settles a batch's worth of contacts instead of a half, a quarter, ... of
        a group; refused, its riders are the pad the search goes on in.

        Only a step of a search for a certain 404 takes riders: a 400 is not about IDs, an
        abandoned request keeps its entries (its fence), a search in a pad takes none (its
        bound), and a retry is the very request again. A step left alone (no riders to be
        had) is a lone request, its 404 a verdict as ever."""
        failure = batch.failure
        if (
            batch.purpose is not Purpose.ISOLATE
            or failure is None
            or failure.reason != "not_found"
            or not failure.certain
            or batch.riders
            or batch.no_riders
            or batch.attempt
            or batch.abandoned_at is not None
        ):
            return batch
        room = self.ceiling - len(batch.entries)
        if room <= 0:
            return batch
        existing = _take(self._existing, room)
        fresh: list[Entry] = []
        short = min(room - len(existing), fresh_riders(self.unknown_share.share, self.ceiling))
        if short > 0 and self._may_form(now):
            # Fresh riders come from the coalescer, never from the pool: what a search
            # returned there was refused once already, and riding it would spoil steps (it
            # goes in the next group instead, where a 404 starts a search of its own).
            known, fresh = self._take_fresh(short, now)
            existing += known  # known IDs first in a pad: its search halves the fresh ones
        riders = existing + fresh
        if not riders:
            return batch
        entries = batch.entries + riders
        kept, body = pack(entries, self.settings.limits.max_bytes)
        keep = max(0, len(kept) - len(batch.entries))
        if keep < len(riders):  # trimmed: back in front of their pools, in order
            self._fresh.extendleft(reversed(fresh[max(0, keep - len(existing)) :]))
            self._existing.extendleft(reversed(existing[keep:]))
        if keep:
            batch.entries, batch.riders, batch.encoded = kept, keep, body
            self.stats.riders += keep
        return batch

    def _take_fresh(self, count: int, now: float) -> tuple[list[Entry], list[Entry]]:
        """Up to ``count`` ready entries from the coalescer, for riders: those known to exist,
        and the fresh ones (known missing: dead-lettered without a request)."""
        known: list[Entry] = []
        fresh: list[Entry] = []
        self._take_in(count, now, fresh, known)
        return known, fresh

    def _may_form(self, now: float) -> bool:
        """Whether a new batch could be formed from the coalescer now (as :meth:`next_batch`
        decides): not while the input's backlog is read ahead, nor before linger is up."""
        hurry = self.draining or not self.has_room
        if self.reading_ahead and not hurry and self._read_ahead_until(now) is not None:
            return False
        due = flush_due(self.coalescer, self.settings.limits, self.ceiling, now, hurry)
        return due is True

    def _exists_at(self, now: float) -> Callable[[str], bool]:
        """Whether an ID is known to exist at ``now``."""
        knowledge = self.knowledge

        def exists(key: str) -> bool:
            fact = knowledge.peek(key, now)
            return fact is not None and fact.known is Known.EXISTS

        return exists

    def _known_missing_letter(self, entry: Entry, fact: Fact, now: float) -> DeadLetter:
        ago_s = max(0.0, now - fact.learnt_at)
        detail = (
            f"found missing by the API {ago_s:.0f} s ago (an earlier 404 on it alone);"
            " not sent again while that is remembered (--suspect-ttl)"
        )
        return DeadLetter(entry, "not_found", 404, "404", detail)

    # -- outcomes --------------------------------------------------------------------------

    def resolve(self, batch: Batch, verdict: Verdict, now: float) -> Settled:
        """Take the outcome of one request; say what to acknowledge and dead-letter."""
        self._outstanding -= 1
        self.stats.requests[str(verdict.status) if verdict.status else "error"] += 1
        settled = Settled()
        action = verdict.action
        if batch.last_answer is not None:
            self._odd.answered(batch.last_answer, verdict)
        if action is Action.APPLIED:
            self._lone_run = 0
            self._contradiction_run = 0  # contradictions count only in a row, as lone 404s
            if self._unconfirmed:
                self._confirm_lone(now, settled)
            self._applied(batch.entries, now, settled, self._fence_until(batch))
            if batch.held is not None:
                held = release_held(batch)
                assert held is not None and held.failure is not None
                if len(held.entries) == 1:
                    self.stats.inferred_culprits += 1
                self._known_bad(held.entries, held.failure, now, settled, held)
        elif action is Action.RETRY:
            self._retry(batch, verdict, now, settled)
        elif action is Action.ISOLATE:
            self._release_held(batch, now)
            if not verdict.certain:
                self._doubtful(batch, verdict, now, settled)
            elif len(batch.entries) == 1 and verdict.reason == "not_found":
                self._lone_not_found(batch, verdict, now, settled)
            else:
                if verdict.reason == "not_found" and batch.purpose is Purpose.NEW:
                    # Its search will find one missing ID: counted now, for the share that
                    # sizes groups and riders while it runs (with requests in flight, groups
                    # applied meanwhile would otherwise make the share look lower and lower).
                    self._missing_ahead += 1
                    self.unknown_share.observe(0, 1)
                self._known_bad(batch.entries, verdict, now, settled, batch)
        elif action is Action.SHRINK:
            self._release_held(batch, now)
            self.stats.shrinks += 1
            self.ceiling = max(1, min(self.ceiling, len(batch.entries) // 2))
            if len(batch.entries) == 1:
                letter = culprit(batch.entries[0], verdict)
                self._dead([letter], now, settled, self._fence_until(batch))
            else:
                self._push_urgent(self._inherit(batch, halves(batch, self._number)))
        else:
            self.fatal = verdict
            settled.fatal = verdict
        return settled

    def _fence_until(self, batch: Batch) -> float | None:
        if batch.abandoned_at is None or self.settings.timeout_grace_s <= 0:
            return None
        return batch.abandoned_at + self.settings.timeout_grace_s

    def _release(self, key: str, fence_until: float | None, applied: Entry | None = None) -> bool:
        """End the request holding ``key``; False if a fence keeps it (and ``applied``)."""
        if fence_until is None:
            self.coalescer.release(key)
            return True
        # Still "in flight" for the coalescer: an abandoned request may yet be applied.
        heapq.heappush(self._fences, (fence_until, key))
        self._fenced[key] = applied
        self.stats.fenced += 1
        return False

    def _applied(
        self,
        entries: list[Entry],
        now: float,
        settled: Settled,
        fence_until: float | None = None,
    ) -> None:
        stats = self.stats
        keys = [entry.key for entry in entries]
        changes = changes_in(entries)
        if fence_until is None:
            self.coalescer.release_many(keys)
            settled.applied.extend(entries)
            settled.applied_changes += changes
        else:
            for entry in entries:
                if self._release(entry.key, fence_until, entry):
                    settled.applied.append(entry)
                    settled.applied_changes += entry.changes
        stats.changes_applied += changes
        fresh = self.knowledge.learn_applied(keys, now, [entry.learnt for entry in entries])
        self.unknown_share.observe(fresh, 0)
        stats.contacts_applied += len(entries)

    def _dead(
        self,
        letters: list[DeadLetter],
        now: float,
        settled: Settled,
        fence_until: float | None = None,
        *,
        learn: bool = True,
    ) -> None:
        """Dead-letter ``letters``; ``learn``: they are the API's answers (not knowledge)."""
        for letter in letters:
            key = letter.entry.key
            self._release(key, fence_until)
            self.stats.dead_letters[letter.reason] += letter.entry.changes
            self.stats.dead_entries[letter.reason] += 1
            if learn and letter.reason == "not_found":
                self.knowledge.learn(key, Known.MISSING, now)
                if self._missing_ahead:  # counted when its search began
                    self._missing_ahead -= 1
                    self.unknown_share.observe(1, 0)
                else:
                    self.unknown_share.observe(1, 1)
        settled.dead.extend(letters)

    def _known_bad(
        self,
        entries: list[Entry],
        failure: Verdict,
        now: float,
        settled: Settled,
        parent: Batch | None = None,
    ) -> None:
        plan = split_known_bad(
            entries,
            failure,
            self._number,
            self._exists_at(now),
            riders=0 if parent is None else parent.riders,
            no_riders=parent is not None and parent.no_riders,
        )
        if isinstance(plan, DeadLetter):
            self._dead([plan], now, settled, None if parent is None else self._fence_until(parent))
        else:
            if parent is not None:
                self._inherit(parent, [plan] if plan.held is None else [plan, plan.held])
            self._push_urgent([plan])

    @staticmethod
    def _inherit(parent: Batch, parts: list[Batch]) -> list[Batch]:
        """Parts of a batch once abandoned carry that on: the API may yet apply the whole."""
        if parent.abandoned_at is not None:
            for part in parts:
                part.abandoned_at = parent.abandoned_at
        return parts

    def _lone_not_found(self, batch: Batch, verdict: Verdict, now: float, settled: Settled) -> None:
        """A lone contact answered 404: held for a 2xx that shows the API answers for real.

        A 404 on an ID the API applied within ``recent_s`` contradicts "unknown ID" (the
        contact may have been deleted since, so it counts, it does not stop); such
        contradictions ``max_contradictions`` times in a row stop sending, as any 404 that is
        not about IDs does, with nothing dead-lettered on their account."""
        letter = culprit(batch.entries[0], verdict)
        fact = self.knowledge.peek(letter.entry.key, now)
        if (
            fact is None
            or fact.known is not Known.EXISTS
            or now - fact.learnt_at > self.settings.recent_s
        ):
            self._contradiction_run = 0
        else:
            self.stats.contradictions += 1
            self._contradiction_run += 1
            limit = self.settings.max_contradictions
            if limit and self._contradiction_run >= limit:
                detail = (
                    f"{self._contradiction_run} lone contacts in a row answered 404 although"
                    " the API applied each of them lately: taken for answers not about IDs"
                    " (a wrong --api-url or account), not for deleted contacts (if they are,"
                    f" raise --max-contradictions or set it to 0); last: {verdict.describe()}"
                )
                self._stop(Action.FOREIGN, verdict, detail, settled)
                return
        self._hold_lone(letter, batch, verdict, now, settled)

    def _hold_lone(
        self, letter: DeadLetter, batch: Batch, verdict: Verdict, now: float, settled: Settled
    ) -> None:
        """A lone verdict (404, or an undocumented code confirmed) waits for a 2xx; a run of
        them with nothing applied in between stops sending."""
        limit = self.settings.max_not_found_run
        if not limit:
            self._dead([letter], now, settled, self._fence_until(batch))
            return
        self._unconfirmed.append((letter, self._fence_until(batch)))
        self._lone_run += 1
        if self._lone_run >= limit:
            what = "404" if letter.reason == "not_found" else f"{verdict.status}/{verdict.error}"
            detail = (
                f"{self._lone_run} lone contacts answered {what} in a row with no"
                " request applied in between: taken for a wrong --api-url or a wrong account,"
                " not for verdicts on the changes (if they are, raise --max-not-found-run or"
                f" set it to 0); last: {verdict.describe()}"
            )
            self._stop(Action.FOREIGN, verdict, detail, settled)

    def _stop(self, action: Action, verdict: Verdict, detail: str, settled: Settled) -> None:
        """Stop sending: ``action`` (FOREIGN or FATAL) ends the run, its answer and why."""
        self.fatal = Verdict(action, verdict.status, verdict.error, detail)
        settled.fatal = self.fatal

    def _confirm_lone(self, now: float, settled: Settled) -> None:
        held, self._unconfirmed = self._unconfirmed, []
        for letter, fence_until in held:
            self._dead([letter], now, settled, fence_until)

    def _doubtful(self, batch: Batch, verdict: Verdict, now: float, settled: Settled) -> None:
        """An error code the API does not document as a verdict on a change: never inferred.

        The same request is sent again with backoff first: a passing fault then costs one
        request, not a split. A group answered so twice in a row is split in halves that are
        both sent; a lone change is dead-lettered ``rejected`` only once the same answer has
        come ``confirm_tries`` times in a row: a passing fault must not cost a valid change.
        """
        answer = (verdict.status, verdict.error)
        batch.same_answers = batch.same_answers + 1 if batch.last_answer == answer else 1
        batch.last_answer = answer
        lone = len(batch.entries) == 1
        tries = self._odd.tries(answer, self.settings.confirm_tries) if lone else 2
        if batch.same_answers < tries:
            self.stats.confirmations += 1
            delay = self.settings.backoff.delay(batch.same_answers, self._rand())
            batch.not_before = now + delay
            heapq.heappush(self._delayed, (batch.not_before, batch.number, batch))
            settled.retry_in_s = delay
        elif not lone:
            self._push_urgent(self._inherit(batch, halves(batch, self._number, Purpose.ISOLATE)))
        else:
            detail = f"{verdict.detail or ''} (the same answer {tries} times)".strip()
            letter = DeadLetter(batch.entries[0], "rejected", verdict.status, verdict.error, detail)
            self._hold_lone(letter, batch, verdict, now, settled)

    def _push_urgent(self, parts: list[Batch]) -> None:
        """Parts of a refused batch go first, in order (depth first): a batch's isolation
        ends, and its valid changes are applied, before other refused batches are opened
        up, and lone answers (which a wrong URL or account shows in) come after a few
        requests instead of after the upper levels of every refused batch."""
        self._urgent.extendleft(reversed(parts))

    def _release_held(self, batch: Batch, now: float) -> None:
        """The held half of a refused part: nothing was learnt about it. It returns to the
        fresh IDs, to ride in their next group (Hwang's generalized binary splitting), unless
        a request of its was abandoned: then it is sent as it is, keeping its fence."""
        held = release_held(batch)
        if held is None:
            return
        held.failure = None
        if held.abandoned_at is not None:
            self._push_urgent([held])
            return
        exists = self._exists_at(now)
        known = [entry for entry in held.entries if exists(entry.key)]
        self._existing.extendleft(reversed(known))
        self._fresh.extendleft(reversed([e for e in held.entries if not exists(e.key)]))

    def _retry(self, batch: Batch, verdict: Verdict, now: float, settled: Settled) -> None:
        batch.attempt += 1
        if verdict.maybe_applied:
            batch.abandoned_at = now
        self.stats.retries += 1
        limit = self.settings.max_retries
        if limit and batch.attempt > limit:
            detail = f"gave up after {limit} retries; last: {verdict.describe()}"
            self._stop(Action.FATAL, verdict, detail, settled)
            return
        delay = self.settings.backoff.delay(batch.attempt, self._rand(), verdict.retry_after_s)
        if verdict.retry_after_s is not None:
            wait = min(verdict.retry_after_s, self.settings.backoff.max_retry_after_s)
            self.paused_until = max(self.paused_until, now + wait)
        batch.not_before = now + delay
        heapq.heappush(self._delayed, (batch.not_before, batch.number, batch))
        settled.retry_in_s = delay

    # -- replay ranges (DESIGN 9) ------------------------------------------------------------

    def start_replay(self, name: Hashable, covers: Covers | None, now: float) -> bool:
        """The source begins a replay range: hold the IDs it covers; False if already held."""
        if name in self._replays:
            return False
        self._replays[name] = Replay(name, covers, now)
        self.coalescer.hold(name, covers)
        return True

    def end_replay(self, name: Hashable, now: float, *, complete: bool = True) -> ReplayEnd | None:
        """The source handed the whole range out: its IDs may be sent; None if not held."""
        replay = self._replays.pop(name, None)
        if replay is None:
            return None
        ids = self.coalescer.unhold(name)
        return ReplayEnd(name, replay.changes, ids, now - replay.since, complete)

    def end_replays_when_full(self, now: float) -> list[ReplayEnd]:
        """With the replay allowance of max-waiting reached, nothing held could ever be sent
        nor more be read: end every hold, although its range is not read to the end (the
        README's limit of DESIGN 9)."""
        if not self._replays or self.may_read:
            return []
        return self._end_all(now, complete=False)

    def end_all_replays(self, now: float) -> list[ReplayEnd]:
        """The input ended: everything it had was read, every range is complete."""
        return self._end_all(now, complete=True)

    def drop_replays(self) -> list[Entry]:
        """Stopping before the ranges were read: forget the held changes (unacknowledged, read
        again by the next run) rather than send part of a range."""
        if not self._replays:
            return []
        coalescer = self.coalescer
        forgotten = coalescer.forget(coalescer.is_held)
        for name in list(self._replays):
            del self._replays[name]
            coalescer.unhold(name)
        return forgotten

    @property
    def replaying(self) -> list[Hashable]:
        """The names of the replay ranges held now."""
        return list(self._replays)

    def _end_all(self, now: float, *, complete: bool) -> list[ReplayEnd]:
        ended = [self.end_replay(name, now, complete=complete) for name in list(self._replays)]
        return [end for end in ended if end is not None]

    def _count_replayed(self, key: str) -> None:
        for replay in self._replays.values():
            if replay.covers is None or replay.covers(key):
                replay.changes += 1


def _take(pool: deque[Entry], limit: int) -> list[Entry]:
    """Up to ``limit`` entries from the front of ``pool``."""
    return [pool.popleft() for _ in range(min(limit, len(pool)))]
