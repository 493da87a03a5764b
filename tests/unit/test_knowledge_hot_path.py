"""ID knowledge on the batcher's hot path: bulk sorting, and facts learnt again in place."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from worker.core.knowledge import MOVE_AFTER, IdKnowledge, Known


@dataclass
class Item:
    key: str


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
    def test_in_place_within_a_share_of_the_ttl(self) -> None:
        """Applied again soon after, a fact keeps its place (only its time changes); applied
        again later than MOVE_AFTER of the TTL, it moves to the end and outlives the bound."""
        ttl = 100.0
        soon, late = ttl * MOVE_AFTER * 0.5, ttl * MOVE_AFTER * 1.5
        k = IdKnowledge(ttl_s=ttl, max_ids=10)
        k.learn_applied([str(n) for n in range(10)], 0.0)
        k.learn_applied(["0"], soon)
        k.learn_applied(["1"], late)
        fact = k.peek("0", late)
        assert fact is not None and soon == fact.learnt_at  # the time moved on
        k.learn_applied([str(n) for n in range(10, 11)], late)  # 11 > 10 + slack 1: no trim
        k.learn_applied([str(n) for n in range(11, 12)], late)  # 12 > 11: trimmed to 10
        kept = {str(n) for n in range(12) if k.peek(str(n), late) is not None}
        assert "0" not in kept  # kept its first place: among the oldest, dropped
        assert "1" in kept  # moved to the end: kept
        assert 10 == len(kept)
