"""The batcher: when to flush, what goes in a request, and its body."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.factories import change
from worker.core.batch import Batch, BatchLimits, Purpose, flush_due, pack
from worker.core.coalesce import Coalescer, Entry

LIMITS = BatchLimits(max_items=3, max_bytes=1 << 20, linger_s=0.2)


def coalescer_with(*ids: int, now: float = 0.0) -> Coalescer:
    """A coalescer holding one change per ID, all arriving at ``now``."""
    coalescer = Coalescer()
    for id_ in ids:
        coalescer.add(change(id_, f"t{id_}", lastname="Lee"), now)
    return coalescer


class TestFlushDue:
    """Flush when full, when the oldest ready change has lingered enough, or when draining."""

    def test_nothing_ready(self) -> None:
        """With nothing ready there is nothing to wait for."""
        assert None is flush_due(Coalescer(), LIMITS, 3, now=5.0, draining=False)

    def test_nothing_ready_while_draining(self) -> None:
        """Draining does not make an empty batch."""
        assert None is flush_due(Coalescer(), LIMITS, 3, now=5.0, draining=True)

    def test_ids_in_flight_are_not_ready(self) -> None:
        """Changes waiting behind a request in flight do not count."""
        coalescer = coalescer_with(1)
        coalescer.pop()
        coalescer.add(change(1, "t", extra1="2"), now=0.0)
        assert None is flush_due(coalescer, LIMITS, 3, now=5.0, draining=False)

    def test_full_at_ceiling(self) -> None:
        """As many ready IDs as the ceiling flush at once, before linger."""
        assert True is flush_due(coalescer_with(1, 2, 3), LIMITS, 3, now=0.0, draining=False)

    def test_ceiling_not_max_items_decides(self) -> None:
        """A lowered ceiling (after a 413) makes fewer entries a full batch."""
        assert True is flush_due(coalescer_with(1, 2), LIMITS, 2, now=0.0, draining=False)

    def test_linger_due_time(self) -> None:
        """Below the ceiling, the answer is when the oldest ready change has lingered enough."""
        coalescer = coalescer_with(1, now=10.0)
        coalescer.add(change(2, "t2", lastname="Lee"), now=10.1)
        assert pytest.approx(10.2) == flush_due(coalescer, LIMITS, 3, now=10.05, draining=False)

    def test_linger_reached(self) -> None:
        """Once lingered enough (exactly or more), it is time."""
        coalescer = coalescer_with(1, now=10.0)
        assert True is flush_due(coalescer, LIMITS, 3, now=10.0 + LIMITS.linger_s, draining=False)
        assert True is flush_due(coalescer, LIMITS, 3, now=99.0, draining=False)

    def test_draining_flushes_without_linger(self) -> None:
        """While draining, anything ready flushes at once."""
        assert True is flush_due(coalescer_with(1, now=10.0), LIMITS, 3, now=10.0, draining=True)

    def test_linger_counts_from_the_oldest_merged_change(self) -> None:
        """A new change to a waiting ID does not restart its linger."""
        coalescer = coalescer_with(1, now=10.0)
        coalescer.add(change(1, "t", extra1="x"), now=10.15)
        assert True is flush_due(coalescer, LIMITS, 3, now=10.2, draining=False)


def fill(coalescer: Coalescer, ceiling: int, max_bytes: int) -> tuple[list[Entry], bytes]:
    """What the scheduler does with ready IDs: take up to ``ceiling``, pack them."""
    return pack(coalescer.pop_many(ceiling), max_bytes)


class TestFill:
    """A batch takes ready entries oldest first, within the ceiling and max_bytes."""

    def test_respects_the_ceiling(self) -> None:
        """No more than ``ceiling`` entries; the rest stay ready, oldest first."""
        coalescer = coalescer_with(1, 2, 3, 4, 5)
        taken, _ = fill(coalescer, 3, 1 << 20)
        assert ["1", "2", "3"] == [e.key for e in taken]
        assert 2 == coalescer.ready_count
        assert all(coalescer.is_in_flight(e.key) for e in taken)

    def test_takes_all_when_fewer_than_the_ceiling(self) -> None:
        """Fewer ready entries than the ceiling: all of them go."""
        taken, _ = fill(coalescer_with(1, 2), 10, 1 << 20)
        assert ["1", "2"] == [e.key for e in taken]

    def test_nothing_ready(self) -> None:
        """Nothing ready: an empty list (and the body ``[]``)."""
        assert ([], b"[]") == fill(Coalescer(), 10, 1 << 20)

    def test_respects_max_bytes(self) -> None:
        """Entries stop before the body would exceed max_bytes; the size is the body's size."""
        coalescer = coalescer_with(1, 2, 3)
        one = len(orjson.dumps({"ID": 1, "lastname": "Lee"}))
        limit = 1 + 2 * (one + 1)  # exactly two entries: "[" + a + "," + b + "]"
        taken, body = fill(coalescer, 10, limit)
        assert ["1", "2"] == [e.key for e in taken]
        assert limit == len(body)
        assert body == Batch(taken, 1).body()

    def test_one_byte_less_takes_one_fewer(self) -> None:
        """A limit one byte under two entries takes one."""
        coalescer = coalescer_with(1, 2, 3)
        one = len(orjson.dumps({"ID": 1, "lastname": "Lee"}))
        taken, body = fill(coalescer, 10, 2 * (one + 1))
        assert ["1"] == [e.key for e in taken]
        assert one + 2 == len(body)

    def test_always_takes_one_even_if_oversized(self) -> None:
        """An entry larger than max_bytes still goes alone: the API judges it."""
        coalescer = Coalescer()
        coalescer.add(change(1, "t1", extra1="x" * 500), now=0.0)
        coalescer.add(change(2, "t2", extra1="y"), now=0.0)
        taken, body = pack(coalescer.pop_many(10), 50)
        assert ["1"] == [e.key for e in taken]
        assert Batch(taken, 1).body() == body

    def test_oldest_first(self) -> None:
        """Entries go in the order of their oldest waiting change."""
        coalescer = Coalescer()
        coalescer.add(change(5, "a", extra1="1"), now=0.0)
        coalescer.add(change(2, "b", extra1="1"), now=1.0)
        coalescer.add(change(9, "c", extra1="1"), now=2.0)
        taken, _ = fill(coalescer, 10, 1 << 20)
        assert ["5", "2", "9"] == [e.key for e in taken]

    @settings(max_examples=150, deadline=None)
    @given(
        st.lists(st.text(max_size=40), min_size=1, max_size=15),
        st.integers(1, 8),
        st.integers(2, 200),
    )
    def test_fill_bounds(self, values: list[str], ceiling: int, max_bytes: int) -> None:
        """Any pack: at least one entry, at most ``ceiling``; over max_bytes only when alone;
        the body is the entries' array, a prefix of those taken, oldest first."""
        coalescer = Coalescer()
        for i, value in enumerate(values):
            coalescer.add(change(i, i, lastname=value), now=0.0)
        taken, body = fill(coalescer, ceiling, max_bytes)
        assert body == Batch(taken, 1).body()
        assert [e.fields for e in taken] == orjson.loads(body)
        assert 1 <= len(taken) <= ceiling
        assert len(taken) == 1 or len(body) <= max_bytes
        assert [str(i) for i in range(len(taken))] == [e.key for e in taken]


class TestBatchBody:
    """The body is the JSON array of the entries as coalesced."""

    def test_body_is_a_json_array_of_the_entries(self) -> None:
        """The body parses back to the entries' objects, in order."""
        coalescer = Coalescer()
        coalescer.add(change(1, "a", lastname="Lée", unsubscribed=True), now=0.0)
        coalescer.add(change("x-2", "b", birthday="2024-02-29", extra3='"quoted"'), now=0.0)
        coalescer.add(change(1, "c", lastname=""), now=0.0)
        taken, _ = fill(coalescer, 10, 1 << 20)
        batch = Batch(taken, 7)
        expected = [
            {"ID": 1, "lastname": "", "unsubscribed": True},
            {"ID": "x-2", "birthday": "2024-02-29", "extra3": '"quoted"'},
        ]
        assert expected == orjson.loads(batch.body())
        assert ["1", "x-2"] == batch.keys

    def test_body_of_one_entry_is_still_an_array(self) -> None:
        """A lone entry is sent as a one-element array."""
        coalescer = coalescer_with(4)
        batch = Batch([coalescer.pop()], 1)
        assert [{"ID": 4, "lastname": "Lee"}] == orjson.loads(batch.body())

    def test_new_batches_are_new_work(self) -> None:
        """A batch starts as new work, with no retries and no held half."""
        batch = Batch([], 1)
        assert (Purpose.NEW, 0, 0.0, None, None) == (
            batch.purpose,
            batch.attempt,
            batch.not_before,
            batch.failure,
            batch.held,
        )
