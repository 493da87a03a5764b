"""The scheduler: batching, isolation, shrinking, retries, suspects and stops (DESIGN 1-7)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.factories import (
    NOW_WALL,
    applied,
    auth_failure,
    change,
    not_found,
    rejected,
    server_error,
    too_large,
    too_many,
)
from worker.core.backoff import MAX_RETRY_AFTER_S, Backoff
from worker.core.batch import Batch, BatchLimits, Purpose
from worker.core.classify import Action, Verdict, classify, classify_failure
from worker.core.grouptest import UnknownShare
from worker.core.scheduler import Scheduler, SchedulerSettings, Settled


def scheduler(
    max_items: int = 100,
    linger_s: float = 0.2,
    rand: float = 0.5,
    **options: Any,
) -> Scheduler:
    """A scheduler with the given limits, its random draws fixed at ``rand``.

    Lone 404s are dead at once unless a test sets ``max_not_found_run`` (TestNotFoundRun).
    """
    options.setdefault("max_not_found_run", 0)
    limits = BatchLimits(max_items=max_items, max_bytes=1 << 20, linger_s=linger_s)
    backoff = Backoff(base_s=0.1, cap_s=30.0)
    return Scheduler(
        SchedulerSettings(limits=limits, backoff=backoff, **options), rand=lambda: rand
    )


def feed(s: Scheduler, *ids: int, now: float = 0.0, value: str = "v") -> None:
    """One change per ID, its token ``"<id>:<value>"``."""
    for id_ in ids:
        s.add(change(id_, f"{id_}:{value}", extra1=value), now)


def take(s: Scheduler, now: float) -> Batch:
    """The next batch, which must be there."""
    batch = s.next_batch(now)
    assert isinstance(batch, Batch), f"expected a batch, got {batch!r}"
    return batch


def keys_of(letters: Settled) -> tuple[list[str], list[str]]:
    """The keys applied and the keys dead-lettered."""
    return [e.key for e in letters.applied], [d.entry.key for d in letters.dead]


class TestSchedulerBatching:
    """When batches form and what they hold."""

    def test_idle_with_nothing(self) -> None:
        """A new scheduler is idle and has nothing to hand out or wait for."""
        s = scheduler()
        assert s.idle
        assert None is s.next_batch(0.0)

    def test_waits_for_linger(self) -> None:
        """Below the ceiling, the answer is when linger ends; then the batch comes."""
        s = scheduler(linger_s=0.2)
        feed(s, 1, 2, now=10.0)
        assert pytest.approx(10.2) == s.next_batch(10.1)
        assert ["1", "2"] == take(s, 10.2).keys
        assert 1 == s.outstanding
        assert not s.idle

    def test_full_batch_goes_at_once(self) -> None:
        """At the ceiling a batch goes without waiting for linger."""
        s = scheduler(max_items=2)
        feed(s, 1, 2, 3)
        assert ["1", "2"] == take(s, 0.0).keys
        assert pytest.approx(0.2) == s.next_batch(0.0)

    def test_draining_flushes_without_linger(self) -> None:
        """Draining sends what is ready at once."""
        s = scheduler(linger_s=60.0)
        feed(s, 1)
        s.draining = True
        assert ["1"] == take(s, 0.0).keys

    def test_has_room_and_max_waiting(self) -> None:
        """The source is slowed at max_waiting changes, and a full scheduler flushes at once."""
        s = scheduler(linger_s=60.0, max_waiting=3)
        feed(s, 1, 1)
        assert s.has_room
        feed(s, 2)
        assert not s.has_room
        assert ["1", "2"] == take(s, 0.0).keys
        assert s.has_room

    def test_id_in_flight_waits_and_keeps_merging(self) -> None:
        """A newer change to an ID in flight is not sent until the older request ends."""
        s = scheduler()
        s.draining = True
        feed(s, 1, value="a")
        first = take(s, 0.0)
        s.add(change(1, "t2", extra1="b"), 0.0)
        s.add(change(1, "t3", lastname="Lee"), 0.0)
        assert None is s.next_batch(1.0)
        s.resolve(first, applied(), 1.0)
        second = take(s, 1.0)
        assert [{"ID": 1, "extra1": "b", "lastname": "Lee"}] == [e.fields for e in second.entries]
        assert ["t2", "t3"] == second.entries[0].tokens

    def test_batches_have_fresh_numbers(self) -> None:
        """Every batch has its own number."""
        s = scheduler(max_items=1)
        feed(s, 1, 2, 3)
        assert 3 == len({take(s, 0.0).number for _ in range(3)})


class TestSchedulerApplied:
    """A 2xx settles every entry of the request."""

    def test_applied_settles_and_counts(self) -> None:
        """All entries are applied; counters count contacts and changes."""
        s = scheduler()
        s.draining = True
        feed(s, 1, 2)
        feed(s, 1, value="w")
        batch = take(s, 0.0)
        settled = s.resolve(batch, applied(), 0.5)
        assert (["1", "2"], []) == keys_of(settled)
        assert (None, None) == (settled.fatal, settled.retry_in_s)
        assert (3, 2, 3) == (s.stats.changes, s.stats.contacts_applied, s.stats.changes_applied)
        assert {"204": 1} == dict(s.stats.requests)
        assert {"new": 1} == dict(s.stats.requests_by_purpose)
        assert s.idle


class TestSchedulerIsolation:
    """Refused batches are halved until the culprits stand alone; the rest is applied."""

    def refused(self, reason: Verdict, *ids: int) -> tuple[Scheduler, Settled]:
        """A scheduler whose first batch of ``ids`` was refused with ``reason``."""
        s = scheduler()
        s.draining = True
        feed(s, *ids)
        return s, s.resolve(take(s, 0.0), reason, 0.0)

    def test_first_half_sent_second_held(self) -> None:
        """After a 404 the first half goes; the second is held, not sent."""
        s, settled = self.refused(not_found(), 1, 2, 3, 4)
        assert ([], []) == keys_of(settled)
        first = take(s, 0.0)
        assert (["1", "2"], Purpose.ISOLATE) == (first.keys, first.purpose)
        assert None is s.next_batch(0.0)

    def test_first_half_applied_held_half_split_without_being_sent(self) -> None:
        """When the first half succeeds, the held half is split straight away, and a lone
        held entry is the culprit without a request of its own."""
        s, _ = self.refused(not_found(), 1, 2, 3, 4)
        settled = s.resolve(take(s, 0.0), applied(), 1.0)
        assert (["1", "2"], []) == keys_of(settled)
        third = take(s, 1.0)
        assert (["3"], Purpose.ISOLATE) == (third.keys, third.purpose)  # not ["3", "4"]
        settled = s.resolve(third, applied(), 2.0)
        assert (["3"], ["4"]) == keys_of(settled)
        letter = settled.dead[0]
        assert ("not_found", 404, "404") == (letter.reason, letter.status, letter.error)
        assert 1 == s.stats.inferred_culprits
        assert {"not_found": 1} == dict(s.stats.dead_letters)
        assert {"new": 1, "isolate": 2} == dict(s.stats.requests_by_purpose)
        assert 2 == s.stats.isolation_requests
        assert s.idle

    def test_first_half_failed_held_half_returns_to_the_fresh(self) -> None:
        """When the first half fails too, the held half returns to the fresh IDs (it goes
        in their next group: nothing was learnt about it), and the failed half is split."""
        s, _ = self.refused(not_found(), 1, 2, 3, 4)
        s.resolve(take(s, 0.0), not_found(), 1.0)
        one = take(s, 1.0)  # depth first: the failed half's own split goes first
        assert ["1"] == one.keys
        held = take(s, 1.0)
        assert (["3", "4"], Purpose.NEW) == (held.keys, held.purpose)
        assert (["3", "4"], []) == keys_of(s.resolve(held, applied(), 2.0))
        settled = s.resolve(one, not_found(), 2.0)
        assert ([], ["1"]) == keys_of(settled)
        two = take(s, 2.0)  # 1's held partner, sent as it is: nothing was learnt about it
        assert ["2"] == two.keys
        assert (["2"], []) == keys_of(s.resolve(two, applied(), 3.0))
        assert 0 == s.stats.inferred_culprits
        assert s.idle

    def test_held_half_failing_on_its_own_is_split(self) -> None:
        """A held half sent whole that fails is isolated by its own failure."""
        s, _ = self.refused(not_found(), 1, 2, 3, 4)
        s.resolve(take(s, 0.0), not_found(), 1.0)
        take(s, 1.0)  # ["1"], left outstanding
        held = take(s, 1.0)
        assert ["3", "4"] == held.keys
        s.resolve(held, rejected(), 2.0)
        three = take(s, 2.0)
        assert ["3"] == three.keys
        settled = s.resolve(three, applied(), 3.0)
        assert (["3"], ["4"]) == keys_of(settled)
        assert ("rejected", "139") == (settled.dead[0].reason, settled.dead[0].error)

    def test_rejected_culprit(self) -> None:
        """A batch-level 400 isolates a lone culprit as rejected with the API's code."""
        s, _ = self.refused(rejected(), 1, 2)
        settled = s.resolve(take(s, 0.0), rejected(), 1.0)
        assert ([], ["1"]) == keys_of(settled)
        letter = settled.dead[0]
        assert ("rejected", 400, "139", "Missing or invalid parameters") == (
            letter.reason,
            letter.status,
            letter.error,
            letter.detail,
        )
        assert {"rejected": 1} == dict(s.stats.dead_letters)

    def test_lone_new_batch_refused_is_dead_at_once(self) -> None:
        """A batch of one refused needs no more requests: it is the culprit."""
        s, settled = self.refused(not_found(), 7)
        assert ([], ["7"]) == keys_of(settled)
        assert s.idle

    def test_every_valid_change_is_still_applied(self) -> None:
        """With one unknown ID among eight, the seven others are applied."""
        s, _ = self.refused(not_found(), *range(1, 9))
        applied_keys: list[str] = []
        dead_keys: list[str] = []
        for _ in range(20):
            batch = s.next_batch(1.0)
            if not isinstance(batch, Batch):
                break
            verdict = not_found() if "6" in batch.keys else applied()
            a, d = keys_of(s.resolve(batch, verdict, 1.0))
            applied_keys += a
            dead_keys += d
        assert (sorted(str(i) for i in range(1, 9) if i != 6), ["6"]) == (
            sorted(applied_keys),
            dead_keys,
        )
        assert s.idle

    def test_changes_arriving_during_isolation_wait(self) -> None:
        """IDs being isolated stay in flight: their new changes wait until they settle."""
        s, _ = self.refused(not_found(), 1, 2)
        feed(s, 2, value="later")
        one = take(s, 0.0)
        assert None is s.next_batch(0.0)
        s.resolve(one, applied(), 1.0)  # 2 is now the inferred culprit, known missing
        assert 1.0 == s.next_batch(1.0)
        settled = s.settle_due(1.0)
        assert settled is not None and ["2:later"] == settled.dead[0].entry.tokens


class TestSchedulerShrink:
    """413: both halves are resent and the ceiling goes down."""

    def test_halves_resent_and_ceiling_lowered(self) -> None:
        """Both halves are handed out (same entries) and the ceiling is halved."""
        s = scheduler(max_items=8)
        feed(s, *range(1, 9))
        batch = take(s, 0.0)
        settled = s.resolve(batch, too_large(), 0.0)
        assert ([], []) == keys_of(settled)
        assert 4 == s.ceiling
        first, second = take(s, 0.0), take(s, 0.0)
        assert batch.entries == first.entries + second.entries
        assert [Purpose.SHRINK, Purpose.SHRINK] == [first.purpose, second.purpose]
        assert 1 == s.stats.shrinks

    def test_new_batches_respect_the_lowered_ceiling(self) -> None:
        """Batches formed after a 413 hold no more than the new ceiling."""
        s = scheduler(max_items=4)
        feed(s, *range(1, 5))
        s.resolve(take(s, 0.0), too_large(), 0.0)
        take(s, 0.0)
        take(s, 0.0)
        feed(s, *range(10, 20))
        assert 2 == len(take(s, 0.0).keys)

    def test_ceiling_never_rises(self) -> None:
        """A 413 on a batch formed before an earlier 413 does not raise the ceiling."""
        s = scheduler(max_items=8)
        feed(s, *range(1, 17))
        big1, big2 = take(s, 0.0), take(s, 0.0)
        s.resolve(big1, too_large(), 0.0)
        s.resolve(take(s, 0.0), too_large(), 0.0)  # half of 8: ceiling 2
        assert 2 == s.ceiling
        s.resolve(big2, too_large(), 0.0)
        assert 2 == s.ceiling

    def test_lone_entry_too_large_is_rejected(self) -> None:
        """One entry refused as too large is dead-lettered as rejected; ceiling stays >= 1."""
        s = scheduler(max_items=1)
        feed(s, 1)
        settled = s.resolve(take(s, 0.0), too_large(), 0.0)
        assert ([], ["1"]) == keys_of(settled)
        assert ("rejected", 413) == (settled.dead[0].reason, settled.dead[0].status)
        assert 1 == s.ceiling

    def test_shrink_of_an_isolating_half_releases_the_held_half(self) -> None:
        """A first half refused as too large: its held half returns to the fresh IDs."""
        s = scheduler()
        s.draining = True
        feed(s, 1, 2, 3, 4)
        s.resolve(take(s, 0.0), not_found(), 0.0)
        s.resolve(take(s, 0.0), too_large(), 0.0)
        handed = [take(s, 0.0).keys for _ in range(4)]
        # depth first: the halves first; the held half then goes under the lowered ceiling
        assert [["1"], ["2"], ["3"], ["4"]] == handed


class TestSchedulerRetry:
    """Transient failures keep the batch and hand it out again after its backoff."""

    def test_retry_keeps_the_batch_until_not_before(self) -> None:
        """The same batch (same entries) comes back only once its not_before is reached."""
        s = scheduler(rand=0.5)
        s.draining = True
        feed(s, 1, 2)
        batch = take(s, 10.0)
        settled = s.resolve(batch, server_error(), 10.0)
        assert ([], [], 0.05) == (*keys_of(settled), settled.retry_in_s)
        assert (1, 10.05) == (batch.attempt, batch.not_before)
        assert 1 == s.retrying
        assert 10.05 == s.next_batch(10.0)
        assert 10.05 == s.next_batch(10.04)
        again = take(s, 10.05)
        assert batch is again
        assert ["1", "2"] == again.keys
        assert 1 == s.stats.retries

    def test_backoff_grows_with_attempts(self) -> None:
        """Each failure of the same batch doubles the jitter's ceiling."""
        s = scheduler(rand=0.5)
        s.draining = True
        feed(s, 1)
        batch = take(s, 0.0)
        delays = []
        now = 0.0
        for _ in range(4):
            delay = s.resolve(batch, server_error(), now).retry_in_s
            assert delay is not None
            delays.append(delay)
            now += delay
            assert batch is take(s, now)
        assert pytest.approx([0.05, 0.1, 0.2, 0.4]) == delays

    def test_new_work_is_not_held_up_by_a_backoff(self) -> None:
        """While a batch waits to be retried, other ready IDs still go."""
        s = scheduler()
        s.draining = True
        feed(s, 1)
        s.resolve(take(s, 0.0), server_error(), 0.0)
        feed(s, 2)
        assert ["2"] == take(s, 0.0).keys

    def test_new_changes_to_a_retried_id_wait(self) -> None:
        """A retry never reorders: newer changes to its IDs wait for it to settle."""
        s = scheduler()
        s.draining = True
        feed(s, 1, value="old")
        batch = take(s, 0.0)
        s.resolve(batch, server_error(), 0.0)
        feed(s, 1, value="new")
        again = take(s, 1.0)
        assert batch is again
        assert None is s.next_batch(1.0)
        s.resolve(again, applied(), 1.0)
        assert ["1:new"] == take(s, 1.0).entries[0].tokens

    def test_retry_after_pauses_everything(self) -> None:
        """A Retry-After stops every request, new or retried, until it has passed."""
        s = scheduler(rand=0.5)
        s.draining = True
        feed(s, 1)
        s.resolve(take(s, 10.0), too_many("5"), 10.0)
        assert 15.0 == s.paused_until
        feed(s, 2)
        assert 15.0 == s.next_batch(10.0)
        assert 15.0 == s.next_batch(14.99)
        assert ["2"] == take(s, 15.0).keys  # the retry itself waits its jitter: 15.05
        assert 15.05 == s.next_batch(15.0)
        assert ["1"] == take(s, 15.05).keys

    def test_a_shorter_retry_after_does_not_shorten_the_pause(self) -> None:
        """Pauses only extend: a later, shorter Retry-After leaves the longer pause."""
        s = scheduler(max_items=1)
        feed(s, 1, 2)
        one, two = take(s, 0.0), take(s, 0.0)
        s.resolve(one, too_many("30"), 0.0)
        s.resolve(two, too_many("1"), 0.5)
        assert 30.0 == s.paused_until

    @pytest.mark.parametrize("header", ["1000000000", "99999999999999"])
    def test_huge_retry_after_pauses_at_most_the_cap(self, header: str) -> None:
        """A server asking for more than --max-retry-after (default five minutes) is taken
        to mean that much: the pause too."""
        s = scheduler(rand=0.0)
        s.draining = True
        feed(s, 1)
        batch = take(s, 0.0)
        s.resolve(batch, classify(429, b"", header, NOW_WALL), 0.0)
        assert MAX_RETRY_AFTER_S == batch.not_before
        assert batch is s.next_batch(MAX_RETRY_AFTER_S)

    def test_unlimited_retries_by_default(self) -> None:
        """By default a batch is retried however often it fails."""
        s = scheduler(rand=0.0)
        s.draining = True
        feed(s, 1)
        batch = take(s, 0.0)
        for _ in range(200):
            assert None is s.resolve(batch, server_error(), 0.0).fatal
            assert batch is take(s, 0.0)
        assert None is s.fatal

    def test_max_retries_then_fatal(self) -> None:
        """Past max_retries the failure is fatal and nothing more is handed out."""
        s = scheduler(rand=0.0, max_retries=2)
        s.draining = True
        feed(s, 1)
        batch = take(s, 0.0)
        for _ in range(2):
            assert None is s.resolve(batch, server_error(), 0.0).fatal
            take(s, 0.0)
        settled = s.resolve(batch, server_error(), 0.0)
        detail = "gave up after 2 retries; last: HTTP 503: error server error: try later"
        expected = Verdict(Action.FATAL, 503, "server error", detail)
        assert (expected, expected) == (settled.fatal, s.fatal)
        assert ([], []) == keys_of(settled)
        feed(s, 2)
        assert None is s.next_batch(100.0)

    def test_retried_isolating_half_keeps_its_held_half(self) -> None:
        """A first half that is retried still splits its held half once applied."""
        s = scheduler(rand=0.5)
        s.draining = True
        feed(s, 1, 2, 3, 4)
        s.resolve(take(s, 0.0), not_found(), 0.0)
        first = take(s, 0.0)
        s.resolve(first, server_error(), 0.0)
        assert 0.05 == s.next_batch(0.0)  # the held half is not sent meanwhile
        assert first is take(s, 0.05)
        s.resolve(first, applied(), 0.1)
        assert ["3"] == take(s, 0.1).keys

    def test_wake_is_the_earliest_of_linger_and_retry(self) -> None:
        """With nothing to hand out now, the answer is the first time something will be."""
        s = scheduler(rand=0.5, linger_s=5.0, max_items=2)
        feed(s, 1, 2)
        batch = take(s, 0.0)
        s.resolve(batch, server_error(), 0.0)  # retry at 0.05
        feed(s, 3, now=0.0)  # lingers until 5.0
        assert 0.05 == s.next_batch(0.01)
        assert batch is take(s, 0.05)
        assert 5.0 == s.next_batch(0.06)
        assert ["3"] == take(s, 5.0).keys


class TestSchedulerKnowledge:
    """What the API said about IDs shapes the batches (DESIGN 11): IDs known missing are
    dead-lettered without a request, IDs known to exist go together."""

    def found_missing(self, key: int = 9, now: float = 0.0, **options: Any) -> Scheduler:
        """A scheduler that just dead-lettered ``key`` as not_found."""
        s = scheduler(suspect_ttl_s=100.0, **options)
        s.draining = True
        feed(s, key, now=now)
        settled = s.resolve(take(s, now), not_found(), now)
        assert ([], [str(key)]) == keys_of(settled)
        return s

    def test_known_missing_dead_without_a_request(self) -> None:
        """A later change to a missing ID is dead-lettered at once; the others are sent."""
        s = self.found_missing()
        feed(s, 1, 9, 2, now=10.0)
        batch = take(s, 10.0)
        assert (["1", "2"], Purpose.NEW) == (batch.keys, batch.purpose)
        settled = s.settle_due(10.0)
        assert settled is not None and ([], ["9"]) == keys_of(settled)
        letter = settled.dead[0]
        assert ("not_found", 404) == (letter.reason, letter.status)
        assert "10 s ago" in (letter.detail or "")
        assert 2 == sum(s.stats.requests_by_purpose.values())  # the first 404 and this one

    def test_only_known_missing_ready(self) -> None:
        """Nothing but a known missing ID ready: no request, a dead letter to settle."""
        s = self.found_missing()
        feed(s, 9, now=10.0)
        assert 10.0 == s.next_batch(10.0)
        settled = s.settle_due(10.0)
        assert settled is not None and ([], ["9"]) == keys_of(settled)
        assert s.idle

    def test_knowledge_is_not_refreshed_by_itself(self) -> None:
        """A dead letter from knowledge does not renew it: it ends ``suspect_ttl_s`` after
        the API's answer, however often the ID comes back."""
        s = self.found_missing()
        feed(s, 9, now=50.0)
        assert 50.0 == s.next_batch(50.0)
        s.settle_due(50.0)
        feed(s, 9, 1, now=100.0)
        assert ["9", "1"] == take(s, 100.0).keys

    def test_forgotten_after_the_ttl(self) -> None:
        """After suspect_ttl_s the ID batches with others again."""
        s = self.found_missing(now=0.0)
        feed(s, 1, 9, now=100.0)
        batch = take(s, 100.0)
        assert (["1", "9"], Purpose.NEW) == (batch.keys, batch.purpose)

    def test_known_to_exist_go_together(self) -> None:
        """IDs applied before go in a full batch of their own; fresh ones in their group."""
        s = scheduler(max_items=4)
        s.draining = True
        feed(s, 1, 2, 3, 4)
        s.resolve(take(s, 0.0), applied(), 0.0)
        feed(s, 10, 1, 11, 2, 3, 4, now=1.0)
        first = take(s, 1.0)
        assert ["1", "2", "3", "4"] == first.keys
        assert ["10", "11"] == take(s, 1.0).keys

    def test_fresh_group_topped_up_with_known(self) -> None:
        """A fresh group smaller than the batch is topped up with IDs known to exist."""
        s = scheduler(max_items=100)
        s.draining = True
        feed(s, *range(1, 6))
        s.resolve(take(s, 0.0), applied(), 0.0)
        feed(s, 1, 2, 100, 101, now=1.0)
        assert ["100", "101", "1", "2"] == take(s, 1.0).keys

    def test_search_of_a_topped_up_group_halves_the_fresh(self) -> None:
        """A refused group of 64 fresh IDs topped up with 36 known to exist: the search
        halves the fresh ones (the known almost never fail); the known ones returned by it
        ride with the next step of the search."""
        s = scheduler(max_items=100)
        s.draining = True
        feed(s, *range(1000, 1036))
        s.resolve(take(s, 0.0), applied(), 0.0)
        feed(s, *range(1000, 1036), now=1.0)
        feed(s, *range(1, 65), now=1.0)
        group = take(s, 1.0)
        assert (64, 100) == (s.group, len(group.keys))
        s.resolve(group, not_found(), 1.0)
        first = take(s, 1.0)
        assert [str(n) for n in range(1, 33)] == first.keys
        s.resolve(first, not_found(), 1.0)  # the culprit is among 1..32
        second = take(s, 1.0)
        assert [str(n) for n in range(1, 17)] == [entry.key for entry in second.core]
        assert [str(n) for n in range(1000, 1036)] == second.keys[16:]
        assert 36 == second.riders
        assert 0 == len(s._existing) and 32 == len(s._fresh)

    def test_deleted_after_it_was_learnt(self) -> None:
        """Knowledge is a prior, not a promise: an ID known to exist that the API no longer
        knows spoils its batch, is isolated like any other, and is known missing after."""
        s = scheduler(max_items=4)
        s.draining = True
        feed(s, 1, 2, 3, 4)
        s.resolve(take(s, 0.0), applied(), 0.0)
        feed(s, 1, 2, 3, 4, now=1.0)
        known = take(s, 1.0)
        assert ["1", "2", "3", "4"] == known.keys
        s.resolve(known, not_found(), 1.0)  # 3 was deleted meanwhile
        first = take(s, 1.0)
        assert (["1", "2"], []) == keys_of(s.resolve(first, applied(), 2.0))
        half = take(s, 2.0)
        assert ["3"] == half.keys
        assert ([], ["3"]) == keys_of(s.resolve(half, not_found(), 2.0))
        assert (["4"], []) == keys_of(s.resolve(take(s, 2.0), applied(), 2.0))
        fact = s.knowledge.peek("3", 3.0)
        assert fact is not None and "missing" == fact.known.value

    def test_memory_is_bounded(self) -> None:
        """Past max_suspects the oldest memory goes first."""
        s = scheduler(suspect_ttl_s=100.0, max_suspects=1)
        s.draining = True
        feed(s, 8)
        s.resolve(take(s, 0.0), not_found(), 0.0)
        feed(s, 9)
        s.resolve(take(s, 0.0), not_found(), 1.0)
        feed(s, 1, 8, 9, now=2.0)
        assert ["1", "8"] == take(s, 2.0).keys
        settled = s.settle_due(2.0)
        assert settled is not None and ([], ["9"]) == keys_of(settled)


class TestContradictions:
    """Knowledge as a guard: lone 404s on IDs the API applied lately contradict "unknown ID";
    repeated, they stop sending like any 404 that is not about IDs."""

    def applied_then(self, now: float, *ids: int, **options: Any) -> Scheduler:
        """A scheduler (lone requests) that had ``ids`` applied at 0, fed them again."""
        s = scheduler(max_items=1, **options)
        s.draining = True
        feed(s, *ids)
        for _ in ids:
            s.resolve(take(s, 0.0), applied(), 0.0)
        feed(s, *ids, now=now, value="again")
        return s

    def test_repeated_contradictions_stop(self) -> None:
        """Three lone 404s in a row on IDs applied a minute ago: FOREIGN, the last one not
        dead-lettered."""
        s = self.applied_then(60.0, 1, 2, 3)
        results = [s.resolve(take(s, 60.0), not_found(), 60.0) for _ in range(3)]
        fatal = results[-1].fatal
        assert fatal is not None and Action.FOREIGN == fatal.action
        assert "applied each of them lately" in (fatal.detail or "")
        assert [] == results[-1].dead
        assert 3 == s.stats.contradictions
        assert None is s.next_batch(60.0)

    def test_one_contradiction_is_a_deleted_contact(self) -> None:
        """A lone 404 on a recently applied ID alone is counted and dead-lettered: the contact
        may have been deleted since."""
        s = self.applied_then(60.0, 1)
        settled = s.resolve(take(s, 60.0), not_found(), 60.0)
        assert (None, ["1"]) == (settled.fatal, [d.entry.key for d in settled.dead])
        assert 1 == s.stats.contradictions

    def test_applied_long_ago_is_no_contradiction(self) -> None:
        """An ID applied longer ago than recent_s may well have been deleted: no count."""
        s = self.applied_then(500.0, 1, 2, 3, recent_s=100.0, suspect_ttl_s=1000.0)
        results = [s.resolve(take(s, 500.0), not_found(), 500.0) for _ in range(3)]
        assert [None, None, None] == [r.fatal for r in results]
        assert 0 == s.stats.contradictions

    def test_a_genuine_unknown_breaks_the_run(self) -> None:
        """A lone 404 on an ID nothing was known of ends the run of contradictions."""
        s = self.applied_then(60.0, 1, 2, 3)
        feed(s, 9, now=60.0)
        order = [take(s, 60.0) for _ in range(4)]
        assert ["1", "2", "3", "9"] == [b.keys[0] for b in order]
        verdicts = [s.resolve(b, not_found(), 60.0) for b in (order[0], order[1], order[3])]
        assert all(v.fatal is None for v in verdicts)
        assert None is s.resolve(order[2], not_found(), 60.0).fatal

    def test_a_request_applied_in_between_breaks_the_run(self) -> None:
        """Contacts deleted in the API now and then, with requests applied in between, are
        not a run: each is a deleted contact, dead-lettered, and sending goes on."""
        s = self.applied_then(60.0, 1, 2, 3)
        feed(s, 7, 8, now=60.0)
        order = [take(s, 60.0) for _ in range(5)]
        assert ["1", "2", "3", "7", "8"] == [b.keys[0] for b in order]
        results = [
            s.resolve(order[0], not_found(), 60.0),
            s.resolve(order[3], applied(), 60.0),
            s.resolve(order[1], not_found(), 60.0),
            s.resolve(order[4], applied(), 60.0),
            s.resolve(order[2], not_found(), 60.0),
        ]
        assert [None] * 5 == [r.fatal for r in results]
        assert 3 == s.stats.contradictions

    def test_zero_turns_the_guard_off(self) -> None:
        """max_contradictions 0: counted, never stops."""
        s = self.applied_then(60.0, 1, 2, 3, max_contradictions=0)
        results = [s.resolve(take(s, 60.0), not_found(), 60.0) for _ in range(3)]
        assert [None, None, None] == [r.fatal for r in results]
        assert 3 == s.stats.contradictions


class TestSchedulerFatal:
    """Auth failures stop everything at once (DESIGN 6)."""

    @pytest.mark.parametrize("verdict", [auth_failure("104"), auth_failure("1002")])
    def test_fatal_auth_stops_handing_out(self, verdict: Verdict) -> None:
        """After a fatal auth verdict nothing more is handed out and nothing is settled."""
        s = scheduler(max_items=1)
        feed(s, 1, 2, 3)
        first, second = take(s, 0.0), take(s, 0.0)
        settled = s.resolve(first, verdict, 0.0)
        assert (Action.FATAL_AUTH, [], []) == (
            settled.fatal and settled.fatal.action,
            *keys_of(settled),
        )
        assert verdict == s.fatal
        s.draining = True
        assert None is s.next_batch(0.0)
        assert None is s.next_batch(1e9)
        s.resolve(second, applied(), 0.0)  # a request already in flight may still end
        assert None is s.next_batch(1e9)

    def test_unexpected_status_is_fatal(self) -> None:
        """A response nobody expected (here a redirect) stops the scheduler too."""
        s = scheduler()
        s.draining = True
        feed(s, 1)
        verdict = classify(302, b"", None, NOW_WALL)
        fatal = s.resolve(take(s, 0.0), verdict, 0.0).fatal
        assert fatal is not None
        assert Action.FATAL == fatal.action
        assert None is s.next_batch(0.0)


class TestAnsweredIds:
    """What a rebalance may wait for: IDs whose requests can still change something at the
    API, not the lone 404s held for a 2xx (answered; the hold of a rebalance would otherwise
    keep the 2xx they wait for from coming)."""

    def test_a_lone_404_held_for_a_2xx_is_answered(self) -> None:
        s = scheduler(max_items=1, max_not_found_run=10)
        s.draining = True
        feed(s, 1, 2)
        first = take(s, 0.0)
        settled = s.resolve(first, not_found(), 0.0)
        assert [] == settled.dead  # held for a 2xx, not dead-lettered yet
        second = take(s, 0.0)
        assert (2, 1) == (s.coalescer.ids_in_flight, s.ids_answered)
        s.resolve(second, applied(), 0.0)  # the 2xx confirms the 404
        assert (0, 0) == (s.coalescer.ids_in_flight, s.ids_answered)


def rider_scheduler(max_items: int, **options: Any) -> Scheduler:
    """A draining scheduler whose unknown share is low (0.1 %): search steps take riders."""
    s = scheduler(max_items=max_items, linger_s=0.0, **options)
    s.unknown_share = UnknownShare(prior_share=0.001)
    s.draining = True
    return s


class TestRiders:
    """Search steps carry riders (worker.core.split): a step's request is full, and what is
    inferred stays sound."""

    def test_search_step_filled_with_fresh_riders(self) -> None:
        """A refused group of 8: its first half goes with 4 fresh riders from the input."""
        s = rider_scheduler(8)
        feed(s, *range(1, 31))
        group = take(s, 0.0)
        assert [str(n) for n in range(1, 9)] == group.keys
        s.resolve(group, not_found(), 0.0)
        first = take(s, 0.0)
        assert Purpose.ISOLATE == first.purpose
        assert ["1", "2", "3", "4"] == [e.key for e in first.core]
        assert (["9", "10", "11", "12"], 4) == (first.keys[4:], first.riders)
        assert 4 == s.stats.riders

    def test_applied_step_applies_its_riders(self) -> None:
        """Applied, a step applies its riders too; the held half is known bad and split at
        once, its first part again with riders."""
        s = rider_scheduler(8)
        feed(s, *range(1, 31))
        s.resolve(take(s, 0.0), not_found(), 0.0)
        settled = s.resolve(take(s, 0.0), applied(), 1.0)
        assert (["1", "2", "3", "4", "9", "10", "11", "12"], []) == keys_of(settled)
        second = take(s, 1.0)
        assert (["5", "6"], 6) == ([e.key for e in second.core], second.riders)
        assert [str(n) for n in range(13, 19)] == second.keys[2:]

    def test_refused_step_goes_on_in_its_core_and_riders(self) -> None:
        """Refused, a step's held part returns to the pool, and the search goes on in the
        step: the first half of its core, with new riders from the input, never the IDs just
        returned (refused once, they go in the next group)."""
        s = rider_scheduler(8)
        feed(s, *range(1, 31))
        s.resolve(take(s, 0.0), not_found(), 0.0)
        s.resolve(take(s, 0.0), not_found(), 1.0)
        assert ["5", "6", "7", "8"] == [e.key for e in s._fresh]
        second = take(s, 1.0)
        assert (["1", "2"], 6) == ([e.key for e in second.core], second.riders)
        assert [str(n) for n in range(13, 19)] == second.keys[2:]

    def refused_down_to_one(self) -> tuple[Scheduler, Batch]:
        """Group 1-4 refused, step [1, 2] + 5, 6 refused, step [1] + 7, 8, 9 refused: the
        core is 1, the pad 7-9. Returns the scheduler and the step that goes next."""
        s = rider_scheduler(4)
        feed(s, *range(1, 21))
        s.resolve(take(s, 0.0), not_found(), 0.0)
        step = take(s, 0.0)
        assert (["1", "2", "5", "6"], 2) == (step.keys, step.riders)
        s.resolve(step, not_found(), 0.0)
        step = take(s, 0.0)
        assert (["1", "7", "8", "9"], 3) == (step.keys, step.riders)
        s.resolve(step, not_found(), 0.0)
        return s, take(s, 0.0)

    def test_core_of_one_sends_the_pad_and_infers_the_culprit(self) -> None:
        """Core 1 and pad 7-9: the pad goes without riders; applied, 1 is the culprit, found
        without a request of its own (every other member of the refused step was applied)."""
        s, pad = self.refused_down_to_one()
        assert (["7", "8", "9"], 0, Purpose.ISOLATE) == (pad.keys, pad.riders, pad.purpose)
        settled = s.resolve(pad, applied(), 1.0)
        assert (["7", "8", "9"], ["1"]) == keys_of(settled)
        assert ("not_found", 404) == (settled.dead[0].reason, settled.dead[0].status)
        assert 1 == s.stats.inferred_culprits

    def test_refused_pad_is_searched_without_riders(self) -> None:
        """The pad refused: 1 returns to the pool (nothing learnt about it), and the pad is
        searched without riders: its first part goes alone, a lone 404 as ever."""
        s, pad = self.refused_down_to_one()
        settled = s.resolve(pad, not_found(), 1.0)
        assert ([], []) == keys_of(settled)
        assert "1" in [e.key for e in s._fresh]
        lone = take(s, 1.0)
        assert (["7"], 0) == (lone.keys, lone.riders)
        assert ([], ["7"]) == keys_of(s.resolve(lone, not_found(), 2.0))
        assert 0 == s.stats.inferred_culprits

    def test_no_fresh_riders_while_the_share_is_not_low(self) -> None:
        """At the prior share (1 %) a batch of 100 fresh riders would hold one unknown ID:
        the step goes without them."""
        s = scheduler(max_items=100, linger_s=0.0)
        s.draining = True
        feed(s, *range(1, 300))
        group = take(s, 0.0)
        assert 64 == len(group.keys)
        s.resolve(group, not_found(), 0.0)
        first = take(s, 0.0)
        assert (32, 0) == (len(first.keys), first.riders)

    def test_riders_trimmed_to_max_bytes_go_back_in_order(self) -> None:
        """Riders are dropped first when the body would be too large; the dropped ones go
        back in front of the pool, in order."""
        limits = BatchLimits(max_items=8, max_bytes=1 << 20, linger_s=0.0)
        probe = Scheduler(SchedulerSettings(limits=limits))
        feed(probe, 1)
        small = len(take(probe, 0.0).body())
        feed(probe, 100, value="x" * 60)
        large = len(take(probe, 0.0).body())
        # The group of 8 small ones fits; its first half and two large riders, not three.
        max_bytes = 4 * (small - 1) + 2 * (large - 1) + 8
        s = scheduler(max_items=8, linger_s=0.0, max_not_found_run=0)
        s.settings = SchedulerSettings(
            limits=BatchLimits(max_items=8, max_bytes=max_bytes, linger_s=0.0),
            max_not_found_run=0,
        )
        s.unknown_share = UnknownShare(prior_share=0.001)
        s.draining = True
        feed(s, *range(1, 9))
        feed(s, *range(100, 110), value="x" * 60)
        group = take(s, 0.0)
        assert [str(n) for n in range(1, 9)] == group.keys
        s.resolve(group, not_found(), 0.0)
        first = take(s, 0.0)
        assert (["1", "2", "3", "4", "100", "101"], 2) == (first.keys, first.riders)
        assert len(first.body()) <= max_bytes
        assert ["102", "103"] == [e.key for e in s._fresh]

    def test_no_riders_in_a_search_for_a_rejected_change(self) -> None:
        """A 400 is not about IDs: its search goes without riders."""
        s = rider_scheduler(8)
        feed(s, *range(1, 31))
        s.resolve(take(s, 0.0), rejected(), 0.0)
        first = take(s, 0.0)
        assert (["1", "2", "3", "4"], 0) == (first.keys, first.riders)

    def test_no_riders_in_a_search_of_an_abandoned_request(self) -> None:
        """A request abandoned (it may yet be applied) keeps its entries through its search:
        its IDs are fenced, nothing joins them."""
        s = rider_scheduler(8)
        feed(s, *range(1, 31))
        group = take(s, 0.0)
        s.resolve(group, classify_failure(TimeoutError()), 0.0)
        again = s.next_batch(10.0)
        assert again is group
        s.resolve(group, not_found(), 10.0)
        first = take(s, 10.0)
        assert (["1", "2", "3", "4"], 0) == (first.keys, first.riders)

    def test_a_wrong_url_answering_404_to_everything_stops(self) -> None:
        """Every request answered 404 (a wrong URL): searches with riders still end in lone
        requests, and the run of lone 404s stops sending; nothing is dead-lettered."""
        s = rider_scheduler(8, max_not_found_run=10)
        feed(s, *range(1, 2001))
        requests, dead = 0, 0
        while s.fatal is None:
            batch = s.next_batch(0.0)
            if not isinstance(batch, Batch):
                settled = s.settle_due(0.0)
                assert settled is not None, "stalled before the stop"
                dead += len(settled.dead)
                continue
            requests += 1
            assert requests < 1000, "no stop"
            settled = s.resolve(batch, not_found(), 0.0)
            dead += len(settled.dead)
        assert Action.FOREIGN == s.fatal.action
        assert 0 == dead
        assert 0 < s.stats.riders

    def test_a_refused_group_counts_its_missing_id_at_once(self) -> None:
        """The share sizing groups and riders counts a refused group's missing ID when its
        search begins (groups applied meanwhile must not make the share look lower), and
        the culprit found later only as seen."""
        s = rider_scheduler(8)
        feed(s, *range(1, 31))
        s.resolve(take(s, 0.0), not_found(), 0.0)
        assert (0.0, 1.0) == (s.unknown_share.seen, s.unknown_share.missing)
        s.resolve(take(s, 0.0), applied(), 0.0)  # 1-4 and riders 9-12
        step = take(s, 0.0)  # [5, 6] + riders
        s.resolve(step, applied(), 0.0)  # held [7, 8]: its first part alone
        lone = take(s, 0.0)
        assert ["7"] == [e.key for e in lone.core]
        settled = s.resolve(lone, applied(), 0.0)  # 8 inferred
        assert ["8"] == [d.entry.key for d in settled.dead]
        applied_count = 8 + len(step.keys) + len(lone.keys)
        assert (applied_count + 1.0, 1.0) == (s.unknown_share.seen, s.unknown_share.missing)
