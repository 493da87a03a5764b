"""ID knowledge on the batcher's hot path: bulk sorting, and facts learnt again in place."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from worker.core.knowledge import MOVE_AFTER, IdKnowledge, Known


@dataclass
class Item:
    key: str
    learnt: float = -math.inf


FACTS = st.dictionaries(
    st.sampled_from([str(n) for n in range(12)]),
    st.tuples(st.sampled_from(list(Known)), st.floats(0.0, 20.0)),
    max_size=12,
)


def knowing(facts: dict[str, tuple[Known, float]]) -> IdKnowledge:
    k = IdKnowledge(ttl_s=10.0, max_ids=100)
    for key, (known, at) in sorted(facts.items(), key=lambda kv: kv[1][1]):
        k.learn(key, known, at)
    return k


class TestSort:
    @given(FACTS, st.lists(st.sampled_from([str(n) for n in range(14)]), max_size=20))
    def test_sort_is_lookup_of_each(
        self, facts: dict[str, tuple[Known, float]], keys: list[str]
    ) -> None:
        """sort (the hot path) puts each item where lookup's answer says, in order, and
        counts the same hits and misses."""
        by_lookup, by_sort = knowing(facts), knowing(facts)
        items = [Item(key) for key in keys]
        fresh: deque[Item] = deque()
        existing: deque[Item] = deque()
        missing = by_sort.sort(items, 20.0, fresh, existing)
        answers = [(item, by_lookup.lookup(item.key, 20.0)) for item in items]
        assert [i for i, f in answers if f is None] == list(fresh)
        assert [i for i, f in answers if f is not None and f.known is Known.EXISTS] == list(
            existing
        )
        assert [(i, f) for i, f in answers if f is not None and f.known is Known.MISSING] == (
            missing
        )
        assert (by_lookup.stats.hits, by_lookup.stats.misses) == (
            by_sort.stats.hits,
            by_sort.stats.misses,
        )


class TestLearntAgain:
    def test_left_alone_within_a_share_of_the_ttl(self) -> None:
        """Applied again soon after, a fact is left as it is (its time and its place);
        applied again later than MOVE_AFTER of the TTL, it is learnt anew: its time moves on,
        it moves to the end and outlives the bound."""
        ttl = 100.0
        soon, late = ttl * MOVE_AFTER * 0.5, ttl * MOVE_AFTER * 1.5
        k = IdKnowledge(ttl_s=ttl, max_ids=10)
        k.learn_applied([str(n) for n in range(10)], 0.0)
        k.learn_applied(["0"], soon)
        k.learn_applied(["1"], late)
        fact = k.peek("0", late)
        assert fact is not None and 0.0 == fact.learnt_at  # left as it was
        fact = k.peek("1", late)
        assert fact is not None and late == fact.learnt_at  # learnt anew
        k.learn_applied([str(n) for n in range(10, 11)], late)  # 11 > 10 + slack 1: no trim
        k.learn_applied([str(n) for n in range(11, 12)], late)  # 12 > 11: trimmed to 10
        kept = {str(n) for n in range(12) if k.peek(str(n), late) is not None}
        assert "0" not in kept  # learnt at 0: among the oldest, dropped
        assert "1" in kept  # moved to the end: kept
        assert 10 == len(kept)


class TestBoundDropsTheOldestLearnt:
    def test_an_id_applied_every_fifth_of_the_ttl_is_not_dropped_before_older_facts(
        self,
    ) -> None:
        """At most --known-ids of each kind, the oldest learnt forgotten first: an ID applied
        again and again within a quarter of the TTL must not be the first forgotten (found by
        review: it once kept its first place for ever while its time moved on)."""
        ttl = 100.0
        k = IdKnowledge(ttl_s=ttl, max_ids=10)  # slack 1: trimmed past 11
        k.learn_applied(["hot"], 0.0)
        k.learn_applied([f"a{n}" for n in range(9)], 1.0)
        for at in (20.0, 40.0, 60.0, 80.0):  # each within MOVE_AFTER * ttl of the last
            k.learn_applied(["hot"], at)
        k.learn_applied(["b0", "b1"], 80.0)  # 12 facts: the two oldest learnt go
        assert k.peek("hot", 80.0) is not None  # learnt anew at 40 and 80: among the newest
        assert k.peek("a0", 80.0) is None  # learnt at 1: among the oldest


EXISTS_ONLY = st.dictionaries(
    st.sampled_from([str(n) for n in range(12)]), st.floats(0.0, 20.0), max_size=12
)


def learn_applied_one_by_one(k: IdKnowledge, keys: list[str], now: float) -> int:
    """learn_applied as its documentation says, a key at a time: the reference."""
    fresh = 0
    for key in keys:
        fact = k.peek(key, now)
        if fact is None or fact.known is Known.MISSING:
            fresh += 1
        if fact is None or fact.known is Known.MISSING or fact.learnt_at < now - 10.0 * MOVE_AFTER:
            k.learn(key, Known.EXISTS, now)
    return fresh


class TestSortedInBulk:
    @given(EXISTS_ONLY, st.lists(st.sampled_from([str(n) for n in range(14)]), max_size=20))
    def test_nothing_known_missing(self, facts: dict[str, float], keys: list[str]) -> None:
        """With nothing known missing, sort puts each item where lookup says, and counts
        the same."""
        by_lookup = knowing({key: (Known.EXISTS, at) for key, at in facts.items()})
        by_sort = knowing({key: (Known.EXISTS, at) for key, at in facts.items()})
        items = [Item(key) for key in keys]
        fresh: deque[Item] = deque()
        existing: deque[Item] = deque()
        assert [] == by_sort.sort(items, 20.0, fresh, existing)
        answers = [(item, by_lookup.lookup(item.key, 20.0)) for item in items]
        assert [i for i, f in answers if f is None] == list(fresh)
        assert [i for i, f in answers if f is not None] == list(existing)
        assert (by_lookup.stats.hits, by_lookup.stats.misses) == (
            by_sort.stats.hits,
            by_sort.stats.misses,
        )


class TestLearnAppliedInBulk:
    @given(FACTS, st.lists(st.sampled_from([str(n) for n in range(14)]), unique=True, max_size=20))
    def test_same_facts_as_one_by_one(
        self, facts: dict[str, tuple[Known, float]], keys: list[str]
    ) -> None:
        """learn_applied leaves the same facts, in the same order, and counts the same fresh
        IDs as learning each as its documentation says."""
        bulk, one = knowing(facts), knowing(facts)
        now = 20.0
        assert learn_applied_one_by_one(one, keys, now) == bulk.learn_applied(keys, now)
        assert list(one._exists.items()) == list(bulk._exists.items())
        assert list(one._missing.items()) == list(bulk._missing.items())

    def test_a_batch_learnt_lately_is_left_as_it_is(self) -> None:
        """Every ID of the batch learnt within MOVE_AFTER of the TTL: no fact moves, none is
        fresh; one ID among them learnt earlier moves them no more than itself."""
        k = knowing(
            {"1": (Known.EXISTS, 19.0), "2": (Known.EXISTS, 19.5), "3": (Known.EXISTS, 12.0)}
        )
        assert 0 == k.learn_applied(["2", "1"], 20.0)
        assert [("3", 12.0), ("1", 19.0), ("2", 19.5)] == list(k._exists.items())
        assert 0 == k.learn_applied(["2", "3", "1"], 20.0)
        assert [("1", 19.0), ("2", 19.5), ("3", 20.0)] == list(k._exists.items())


class TestLearnAppliedAfterSort:
    @given(
        FACTS,
        st.lists(st.sampled_from([str(n) for n in range(14)]), unique=True, max_size=20),
        st.floats(20.0, 40.0),
    )
    def test_the_times_sort_saw_change_no_fact(
        self, facts: dict[str, tuple[Known, float]], keys: list[str], now: float
    ) -> None:
        """Given the times sort found, learn_applied leaves the same facts in the same order
        and counts the same fresh IDs as it does looking each one up."""
        told, looked = knowing(facts), knowing(facts)
        items = [Item(key) for key in keys]
        told.sort(items, 20.0, deque(), deque())
        looked.sort([Item(key) for key in keys], 20.0, deque(), deque())
        seen = [item.learnt for item in items]
        assert looked.learn_applied(keys, now) == told.learn_applied(keys, now, seen)
        assert list(looked._exists.items()) == list(told._exists.items())
        assert list(looked._missing.items()) == list(told._missing.items())

    def test_an_id_learnt_lately_is_not_looked_up_again(self) -> None:
        """An ID sort found learnt lately is not looked up when its batch is applied: a
        fact dropped meanwhile (the size bound) stays dropped, where a look-up learns it."""
        told, looked = knowing({"1": (Known.EXISTS, 19.0)}), knowing({"1": (Known.EXISTS, 19.0)})
        items = [Item("1"), Item("2")]
        told.sort(items, 20.0, deque(), deque())
        assert [19.0, -math.inf] == [item.learnt for item in items]
        del told._exists["1"], looked._exists["1"]
        assert 1 == told.learn_applied(["1", "2"], 20.0, [item.learnt for item in items])
        assert [("2", 20.0)] == list(told._exists.items())
        assert 2 == looked.learn_applied(["1", "2"], 20.0)
        assert [("1", 20.0), ("2", 20.0)] == list(looked._exists.items())


def test_an_infinite_ttl_still_learns_the_ids_sort_did_not_know() -> None:
    """With an infinite TTL, what sort saw (minus infinity: not known) is not taken for
    "learnt lately": the fresh IDs are learnt, the known ones left as they are."""
    k = IdKnowledge(ttl_s=math.inf, max_ids=100)
    k.learn("1", Known.EXISTS, 5.0)
    items = [Item("1"), Item("2")]
    k.sort(items, 10.0, deque(), deque())
    assert 1 == k.learn_applied(["1", "2"], 10.0, [item.learnt for item in items])
    assert [("1", 5.0), ("2", 10.0)] == list(k._exists.items())


def test_a_journal_no_store_drains_keeps_the_newest_facts_in_bulk() -> None:
    """With the store away, the journal keeps the newest facts only: at most max_ids plus a
    tenth, trimmed to max_ids at once (not a move of the whole journal per fact), in order."""
    k = IdKnowledge(ttl_s=10.0, max_ids=100)
    k.keep_journal()
    sizes = []
    for n in range(0, 300, 5):
        k.learn_applied([str(i) for i in range(n, n + 5)], 1.0)
        k.learn(f"m{n}", Known.MISSING, 1.0)
        sizes.append(len(k._journal or []))
    assert max(sizes) <= 110
    assert sizes.count(100) <= 2  # trimmed in bulk, not back to 100 at every step
    journal = k.drain()
    learnt = [(key, known) for key, known, _ in journal]
    expected = []
    for n in range(0, 300, 5):
        expected += [(str(i), Known.EXISTS) for i in range(n, n + 5)] + [(f"m{n}", Known.MISSING)]
    assert expected[-len(learnt) :] == learnt
    assert 100 <= len(learnt) <= 110
