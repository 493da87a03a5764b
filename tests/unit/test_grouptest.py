"""Group testing (worker.core.grouptest) and ID knowledge (worker.core.knowledge): the plan
that finds unknown IDs, checked against a model of the API whichever IDs are missing."""

from __future__ import annotations

import math

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tests.unit.factories import applied, change, not_found
from worker.core import grouptest
from worker.core.batch import Batch, BatchLimits, Purpose
from worker.core.grouptest import (
    PRIOR_SHARE,
    UnknownShare,
    group_size,
    search_requests,
    worst_case_requests,
)
from worker.core.knowledge import IdKnowledge, Known
from worker.core.scheduler import Scheduler, SchedulerSettings


class TestGroupSize:
    """Hwang's group size for the unknown share, capped by the batch size."""

    @pytest.mark.parametrize(
        ("share", "expected"),
        [(0.001, 100), (0.01, 64), (0.05, 16), (0.1, 8), (0.3, 2), (0.5, 1), (0.9, 1)],
    )
    def test_sizes(self, share: float, expected: int) -> None:
        """2 ** floor(log2((1 - p) / p)), at most the ceiling of 100."""
        assert expected == group_size(share, 100)

    def test_no_unknown_fills_the_batch(self) -> None:
        """With nothing unknown the batch size is the group."""
        assert 7 == group_size(0.0, 7)

    @given(st.floats(min_value=1e-9, max_value=0.49), st.integers(min_value=1, max_value=5000))
    def test_power_of_two_or_ceiling(self, share: float, ceiling: int) -> None:
        """Always a power of two or the ceiling, between 1 and the ceiling."""
        size = group_size(share, ceiling)
        assert 1 <= size <= ceiling
        assert size == ceiling or size & (size - 1) == 0

    def test_bad_ceiling(self) -> None:
        """A ceiling below 1 is a programming error."""
        with pytest.raises(ValueError, match="ceiling"):
            group_size(0.1, 0)


class TestUnknownShare:
    """The share of fresh IDs found missing, estimated online from the API's answers."""

    def test_prior_before_evidence(self) -> None:
        """Nothing seen: the prior share."""
        assert 0.01 == pytest.approx(UnknownShare().share)

    def test_follows_evidence(self) -> None:
        """Much evidence outweighs the prior."""
        share = UnknownShare()
        for _ in range(100):
            share.observe(95, 0)
            share.observe(5, 5)
        assert 0.05 == pytest.approx(share.share, rel=0.05)

    def test_follows_a_change(self) -> None:
        """Old evidence is weighed down: a share that drops is followed."""
        share = UnknownShare(window=1000.0)
        share.observe(1000, 100)
        share.observe(10_000, 0)
        assert share.share < 0.01


class TestKnowledge:
    """Facts about IDs with a time-to-live and a size bound."""

    def test_learn_and_expire(self) -> None:
        """A fact lives ttl_s after it was learnt."""
        k = IdKnowledge(ttl_s=10.0)
        k.learn("1", Known.EXISTS, 0.0)
        fact = k.lookup("1", 9.9)
        assert fact is not None and (Known.EXISTS, 0.0) == (fact.known, fact.learnt_at)
        assert None is k.lookup("1", 10.0)
        assert (1, 1) == (k.stats.hits["exists"], k.stats.misses)

    def test_newer_answer_replaces(self) -> None:
        """An ID found missing that is applied later exists: one fact per ID."""
        k = IdKnowledge()
        k.learn("1", Known.MISSING, 0.0)
        k.learn("1", Known.EXISTS, 1.0)
        fact = k.peek("1", 2.0)
        assert fact is not None and Known.EXISTS == fact.known
        assert 1 == len(k)

    def test_bounded_oldest_first(self) -> None:
        """Past max_ids of a kind, the oldest learnt goes first."""
        k = IdKnowledge(max_ids=2)
        for n, key in enumerate(["1", "2", "3"]):
            k.learn(key, Known.EXISTS, float(n))
        assert None is k.peek("1", 3.0)
        k.learn("4", Known.MISSING, 3.0)  # the other kind has its own bound
        assert [Known.EXISTS, Known.EXISTS, Known.MISSING] == [
            f.known for f in (k.peek(key, 3.0) for key in ("2", "3", "4")) if f is not None
        ]
        assert 1 == k.stats.forgotten

    def test_a_large_bound_is_kept_in_bulk(self) -> None:
        """A large bound is trimmed in one pass past a tenth more, to exactly max_ids, the
        oldest learnt first; a fact learnt again counts as newest."""
        k = IdKnowledge(max_ids=100)
        for n in range(110):
            k.learn(str(n), Known.EXISTS, float(n))
        assert 110 == k.count(Known.EXISTS)
        k.learn("0", Known.EXISTS, 110.0)  # learnt again: the newest now
        k.learn("110", Known.EXISTS, 111.0)
        assert 100 == k.count(Known.EXISTS)
        kept = [str(n) for n in range(112) if k.peek(str(n), 112.0) is not None]
        assert ["0", *[str(n) for n in range(12, 111)]] == kept
        assert 11 == k.stats.forgotten

    def test_learn_applied_is_learn_of_each(self) -> None:
        """learn_applied (the hot path) leaves what learn would, and counts the IDs that were
        not known to exist (fresh or known missing)."""
        one, many = IdKnowledge(max_ids=5, ttl_s=10.0), IdKnowledge(max_ids=5, ttl_s=10.0)
        for k in (one, many):
            k.learn("a", Known.EXISTS, 0.0)
            k.learn("m", Known.MISSING, 0.0)
            k.learn("old", Known.EXISTS, -20.0)
        keys = ["a", "m", "old", "new", "x", "y", "z"]
        for key in keys:
            one.learn(key, Known.EXISTS, 1.0)
        assert 6 == many.learn_applied(keys, 1.0)
        assert [one.peek(key, 1.5) for key in keys] == [many.peek(key, 1.5) for key in keys]
        assert (one.count(Known.EXISTS), one.count(Known.MISSING)) == (
            many.count(Known.EXISTS),
            many.count(Known.MISSING),
        )

    def test_zero_keeps_nothing(self) -> None:
        """max_ids 0 or ttl 0: nothing is kept."""
        for k in (IdKnowledge(max_ids=0), IdKnowledge(ttl_s=0.0)):
            k.learn("1", Known.EXISTS, 0.0)
            assert 0 == len(k)


class TestWorstCase:
    """The plan's bound on requests."""

    def test_nothing_unknown(self) -> None:
        """Only known IDs: full groups and one tail group."""
        assert 11 == worst_case_requests(1000, 0, 100, 100)

    def test_each_unknown_costs_a_search(self) -> None:
        """Each unknown ID: a refused group, a tail group and a search: ceil(log2 B) halvings,
        the pad of the last refused step sent, and ceil(log2 (B - 1)) to search that pad."""
        assert 9 + 1 + 10 * (2 + 15) == worst_case_requests(1000, 10, 100, 100)
        assert 7 + 1 + 7 == search_requests(100) == search_requests(128)
        assert 1 + 1 + 0 == search_requests(2)
        assert 0 == search_requests(1)


# -- the plan against a model of the API ------------------------------------------------------


def run_against_model(
    contacts: int, missing: frozenset[int], batch_size: int, prior_share: float = PRIOR_SHARE
) -> tuple[int, set[str], set[str], int, Scheduler]:
    """Every change added at once, requests sent one at a time and answered by a model API
    (404 if any ID in it is missing, else 204, all or nothing). Returns the requests, the IDs
    applied, the IDs dead-lettered ``not_found``, the smallest group the plan chose."""
    limits = BatchLimits(max_items=batch_size, linger_s=0.0)
    s = Scheduler(SchedulerSettings(limits=limits, max_not_found_run=0), lambda: 0.5)
    s.unknown_share = UnknownShare(prior_share=prior_share)
    for n in range(contacts):
        s.add(change(n, token=n, lastname="x"), 0.0)
    s.draining = True
    requests, smallest = 0, batch_size
    applied_ids: set[str] = set()
    dead_ids: set[str] = set()
    while not s.idle:
        smallest = min(smallest, s.group)
        batch = s.next_batch(0.0)
        if not isinstance(batch, Batch):
            settled = s.settle_due(0.0)
            assert settled is not None, "the plan stalled"
            dead_ids |= {letter.entry.key for letter in settled.dead}
            continue
        requests += 1
        assert requests <= 10 * contacts + 10, "the plan does not end"
        assert len(batch.entries) <= batch_size
        refused = any(int(key) in missing for key in batch.keys)
        settled = s.resolve(batch, not_found() if refused else applied(), 0.0)
        applied_ids |= {entry.key for entry in settled.applied}
        dead_ids |= {letter.entry.key for letter in settled.dead}
        assert all(letter.reason == "not_found" for letter in settled.dead)
    return requests, applied_ids, dead_ids, smallest, s


def model_cases(priors: list[float]) -> st.SearchStrategy[tuple[int, frozenset[int], int, float]]:
    """Up to 400 contacts, any of them missing, a batch size, the unknown share assumed."""
    return st.integers(min_value=1, max_value=400).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.frozensets(st.integers(min_value=0, max_value=n - 1), max_size=n),
            st.sampled_from([1, 2, 3, 4, 8, 16, 100]),
            st.sampled_from(priors),
        )
    )


def settled_within_the_bound(
    contacts: int, missing: frozenset[int], batch_size: int, prior: float
) -> Scheduler:
    requests, applied_ids, dead_ids, smallest, s = run_against_model(
        contacts, missing, batch_size, prior
    )
    assert {str(n) for n in range(contacts) if n not in missing} == applied_ids
    assert {str(n) for n in missing} == dead_ids
    assert requests <= worst_case_requests(contacts, len(missing), smallest, batch_size)
    return s


class TestPlanAgainstModel:
    """Whichever IDs are missing: every valid change applied, every missing ID found, and
    never more requests than the plan's bound."""

    @settings(max_examples=300, deadline=None)
    @given(model_cases([PRIOR_SHARE]))
    def test_every_change_settled_within_the_bound(
        self, case: tuple[int, frozenset[int], int, float]
    ) -> None:
        """Applied exactly the IDs the API knows, dead-lettered exactly the missing ones, in
        at most ``worst_case_requests`` requests."""
        settled_within_the_bound(*case)

    @settings(max_examples=30, deadline=None)
    @given(st.integers(min_value=0, max_value=2**32 - 1))
    def test_sparse_unknowns_cost_a_binary_search_each(self, seed: int) -> None:
        """1% unknown among 2,000 fresh IDs: no more requests than full batches plus one
        refused group and a binary search per unknown ID (the sibling of a refused half is
        never sent on its own, it rides with fresh IDs)."""
        import random

        rng = random.Random(seed)
        missing = frozenset(n for n in range(2000) if rng.random() < 0.01)
        requests, applied_ids, dead_ids, _, s = run_against_model(2000, missing, 100)
        assert 2000 - len(missing) == len(applied_ids)
        assert len(missing) == len(dead_ids)
        assert requests <= math.ceil(2000 / 64) + 1 + len(missing) * (1 + search_requests(100))
        assert 0 == s.stats.requests_by_purpose["suspect"]


class TestPlanWithRidersAgainstModel:
    """The same with a low unknown share, where search steps carry riders: whichever IDs are
    missing, every valid change applied, every missing ID dead-lettered, within the bound."""

    @settings(max_examples=300, deadline=None)
    @given(model_cases([0.001, 0.0001]))
    def test_every_change_settled_within_the_bound(
        self, case: tuple[int, frozenset[int], int, float]
    ) -> None:
        """Applied exactly the IDs the API knows, dead-lettered exactly the missing ones, in
        at most ``worst_case_requests`` requests."""
        s = settled_within_the_bound(*case)
        event(f"riders: {'yes' if s.stats.riders else 'no'}")

    def test_riders_cost_more_than_halving_at_worst(self) -> None:
        """With riders a search may spend more than halving its group: 38 contacts, 9 and 29
        missing, batches of 8 take 16 requests, one more than a bound of ceil(log2 8) per
        search allows (the pad of a refused step is sent, then searched): the bound's extra
        terms are needed, and the plan stays within them."""
        requests, _, dead_ids, smallest, s = run_against_model(38, frozenset({9, 29}), 8, 0.001)
        assert {"9", "29"} == dead_ids
        assert 0 < s.stats.riders
        halving_only = 30 // smallest + 1 + 2 * (2 + 3)
        assert halving_only < requests <= worst_case_requests(38, 2, smallest, 8)

    def test_sparse_unknowns_with_riders(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """0.1 % unknown among 50,000 fresh IDs, batches of 100: fewer requests than without
        fresh riders on the same IDs (the steps of a search are full), every ID settled."""
        import random

        rng = random.Random(13)
        missing = frozenset(n for n in range(50_000) if rng.random() < 0.001)
        with_riders, applied_ids, dead_ids, _, s = run_against_model(50_000, missing, 100, 0.001)
        assert (50_000 - len(missing), len(missing)) == (len(applied_ids), len(dead_ids))
        assert 0 < s.stats.riders
        monkeypatch.setattr(grouptest, "RIDER_NOISE", 0.0)
        without, _, _, _, s = run_against_model(50_000, missing, 100, 0.001)
        assert 0 == s.stats.riders
        assert with_riders < without


class TestRecurringIds:
    """A second pass over the same contacts: known IDs cost one request per full batch, IDs
    known missing none."""

    def test_second_pass_needs_only_full_batches(self) -> None:
        """After one pass has taught which IDs exist, a second pass over the same contacts
        (the missing ones included) takes ceil(contacts / B) requests and no isolation."""
        missing = frozenset(range(0, 1000, 37))
        _, _, _, _, s = run_against_model(1000, missing, 100)
        before = sum(s.stats.requests_by_purpose.values())
        for n in range(1000):
            s.add(change(n, token=("again", n), lastname="y"), 1.0)
        dead = 0
        while not s.idle:
            batch = s.next_batch(1.0)
            if not isinstance(batch, Batch):
                settled = s.settle_due(1.0)
                assert settled is not None
                dead += len(settled.dead)
                assert all("earlier 404" in (d.detail or "") for d in settled.dead)
                continue
            assert Purpose.NEW == batch.purpose
            assert not any(int(key) in missing for key in batch.keys)
            s.resolve(batch, applied(), 1.0)
        again = sum(s.stats.requests_by_purpose.values()) - before
        assert (math.ceil((1000 - len(missing)) / 100), len(missing)) == (again, dead)
