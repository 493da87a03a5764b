"""Replay ranges (DESIGN 9): what may have been read before a crash is held, coalesced per ID,
and only then sent; the decisions of the coalescer and the scheduler, without I/O."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.factories import applied, change
from worker.core.batch import Batch, BatchLimits
from worker.core.coalesce import Coalescer
from worker.core.scheduler import ReplayEnd, Scheduler, SchedulerSettings


def popped_keys(coalescer: Coalescer) -> list[str]:
    """Pop every ready entry; their keys in pop order."""
    keys = []
    while coalescer.peek() is not None:
        keys.append(coalescer.pop().key)
    return keys


def odd(key: str) -> bool:
    """A hold's cover: the odd IDs (as a partition would be)."""
    return int(key) % 2 == 1


def scheduler(max_waiting: int = 1000, max_items: int = 100) -> Scheduler:
    """A scheduler with no linger, so that anything ready is sent at once."""
    limits = BatchLimits(max_items=max_items, max_bytes=1 << 20, linger_s=0.0)
    return Scheduler(SchedulerSettings(limits=limits, max_waiting=max_waiting))


def sent_keys(s: Scheduler, now: float = 0.0) -> list[str]:
    """Every batch the scheduler hands out now, applied at once; the keys, in order."""
    keys: list[str] = []
    while isinstance(batch := s.next_batch(now), Batch):
        keys += batch.keys
        s.resolve(batch, applied(), now)
    return keys


class TestCoalescerHolds:
    """A hold keeps the IDs it covers waiting (still merging) until it ends."""

    def test_held_ids_merge_and_become_ready_oldest_first(self) -> None:
        """Under a hold over every ID nothing is ready; its end makes each ID ready once, with
        every change merged (later wins), oldest first."""
        coalescer = Coalescer()
        coalescer.hold("r", None)
        coalescer.add(change(2, "a", extra1="1"), 0.0)
        coalescer.add(change(1, "b", extra1="1"), 0.0)
        coalescer.add(change(2, "c", extra1="2"), 0.0)
        assert (0, 2, 2) == (coalescer.ready_count, coalescer.ids_held, coalescer.ids_waiting)
        assert 2 == coalescer.unhold("r")
        assert 2 == coalescer.ready_count
        first = coalescer.pop()
        taken = (first.key, first.fields, first.tokens)
        assert ("2", {"ID": 2, "extra1": "2"}, ["a", "c"]) == taken
        assert ["1"] == popped_keys(coalescer)

    def test_a_cover_holds_only_its_ids(self) -> None:
        """A hold over the odd IDs leaves the even ones ready."""
        coalescer = Coalescer()
        coalescer.hold("p1", odd)
        for i in range(1, 5):
            coalescer.add(change(i, f"t{i}", extra1="x"), 0.0)
        assert ["2", "4"] == popped_keys(coalescer)
        coalescer.unhold("p1")
        assert ["1", "3"] == popped_keys(coalescer)

    def test_a_hold_takes_ready_ids_back(self) -> None:
        """IDs already ready when a hold starts are held too (a partition taken mid-run)."""
        coalescer = Coalescer()
        for i in range(1, 5):
            coalescer.add(change(i, f"t{i}", extra1="x"), 0.0)
        coalescer.hold("p1", odd)
        assert ["2", "4"] == popped_keys(coalescer)
        coalescer.unhold("p1")
        assert ["1", "3"] == popped_keys(coalescer)

    def test_an_id_released_from_flight_stays_held(self) -> None:
        """A request that ends while its ID is covered leaves the newer changes held."""
        coalescer = Coalescer()
        coalescer.add(change(1, "a", extra1="1"), 0.0)
        assert ["1"] == popped_keys(coalescer)
        coalescer.hold("r", None)
        coalescer.add(change(1, "b", extra1="2"), 0.0)
        coalescer.release("1")
        assert None is coalescer.peek()
        coalescer.unhold("r")
        assert ["1"] == popped_keys(coalescer)

    def test_an_id_under_two_holds_waits_for_both(self) -> None:
        """An ID covered by two holds becomes ready only when both ended."""
        coalescer = Coalescer()
        coalescer.hold("all", None)
        coalescer.hold("p1", odd)
        coalescer.add(change(1, "a", extra1="1"), 0.0)
        coalescer.add(change(2, "b", extra1="1"), 0.0)
        assert 1 == coalescer.unhold("all")
        assert ["2"] == popped_keys(coalescer)
        assert 1 == coalescer.unhold("p1")
        assert ["1"] == popped_keys(coalescer)
        assert 0 == coalescer.unhold("p1")

    def test_forget_drops_held_ids(self) -> None:
        """A partition lost while held: its held changes are forgotten, nothing left held."""
        coalescer = Coalescer()
        coalescer.hold("p1", odd)
        coalescer.add(change(1, "a", extra1="1"), 0.0)
        assert ["1"] == [e.key for e in coalescer.forget(odd)]
        coalescer.unhold("p1")
        assert (0, 0, 0) == (coalescer.ids_held, coalescer.ids_waiting, coalescer.changes_waiting)


class TestSchedulerReplay:
    """The scheduler holds a replay range's IDs until the source says it was read."""

    def test_nothing_of_a_range_is_sent_before_it_ends(self) -> None:
        """While the range is held, even draining sends none of it; at its end each ID goes
        once, with its newest values, and the end reports the counts."""
        s = scheduler()
        assert s.start_replay("in.jsonl", None, now=1.0)
        assert not s.start_replay("in.jsonl", None, now=1.0)
        s.add(change(7, "a", unsubscribed=False, extra1="1"), 1.0)
        s.add(change(8, "b", extra1="1"), 1.0)
        s.add(change(7, "c", unsubscribed=True, extra1="2"), 1.5)
        s.draining = True
        assert None is s.next_batch(2.0)
        assert not s.idle
        end = s.end_replay("in.jsonl", now=3.0)
        assert ReplayEnd("in.jsonl", 3, 2, 2.0, True) == end
        batch = s.next_batch(3.0)
        assert isinstance(batch, Batch)
        assert [{"ID": 7, "unsubscribed": True, "extra1": "2"}, {"ID": 8, "extra1": "1"}] == [
            e.fields for e in batch.entries
        ]
        assert None is s.end_replay("in.jsonl", now=3.0)

    def test_other_partitions_flow_while_one_is_held(self) -> None:
        """A partition taken mid-run holds its IDs only; the others are sent meanwhile."""
        s = scheduler()
        s.start_replay("p1", odd, now=0.0)
        for i in range(1, 7):
            s.add(change(i, f"t{i}", extra1="x"), 0.0)
        assert ["2", "4", "6"] == sent_keys(s)
        end = s.end_replay("p1", now=0.5)
        assert end is not None and (3, 3) == (end.changes, end.ids)
        assert ["1", "3", "5"] == sent_keys(s)

    def test_a_held_range_reads_up_to_twice_max_waiting(self) -> None:
        """While a range is held, reading goes on past max-waiting, up to twice it (what the
        crashed run held: its waiting changes and those in flight)."""
        s = scheduler(max_waiting=2)
        s.start_replay("a", None, now=0.0)
        for i in range(1, 4):
            s.add(change(i, f"t{i}", extra1="x"), 0.0)
        assert (False, True) == (s.has_room, s.may_read)
        s.add(change(4, "t4", extra1="x"), 0.0)
        assert not s.may_read
        s.end_replay("a", now=0.0)
        assert not s.may_read  # without a hold, max-waiting again

    def test_a_full_scheduler_ends_every_hold_incomplete(self) -> None:
        """At twice max-waiting nothing held could go nor more be read: every hold ends, marked
        incomplete; below it, none does."""
        s = scheduler(max_waiting=2)
        s.start_replay("a", None, now=0.0)
        s.start_replay("b", odd, now=0.0)
        for i in range(1, 4):
            s.add(change(i, f"t{i}", extra1="x"), 0.0)
        assert [] == s.end_replays_when_full(1.0)
        s.add(change(4, "t4", extra1="x"), 0.0)
        ends = s.end_replays_when_full(1.0)
        assert [("a", False), ("b", False)] == [(e.name, e.complete) for e in ends]
        assert [] == s.replaying
        assert ["1", "2", "3", "4"] == sent_keys(s, 1.0)

    def test_the_end_of_input_completes_every_range(self) -> None:
        """A finite input read to its end: every range was read."""
        s = scheduler()
        s.start_replay("a", None, now=0.0)
        s.add(change(1, "t1", extra1="x"), 0.0)
        assert [("a", True, 1)] == [(e.name, e.complete, e.ids) for e in s.end_all_replays(1.0)]

    def test_a_stop_forgets_the_held_changes(self) -> None:
        """Stopping before a range was read: its held changes are forgotten (read again by the
        next run), the others still go, and the scheduler can become idle."""
        s = scheduler()
        s.start_replay("p1", odd, now=0.0)
        for i in range(1, 5):
            s.add(change(i, f"t{i}", extra1="x"), 0.0)
        dropped = s.drop_replays()
        assert ["1", "3"] == sorted(e.key for e in dropped)
        assert [] == s.replaying
        assert ["2", "4"] == sent_keys(s)
        assert s.idle

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.tuples(st.integers(1, 4), st.integers(0, 9)), min_size=1, max_size=40),
        st.lists(st.integers(1, 10), min_size=1, max_size=10),
    )
    def test_a_replayed_range_never_sends_an_older_value(
        self, changes: list[tuple[int, int]], slices: list[int]
    ) -> None:
        """However the range arrives in slices, with sending between them, every ID is sent
        once, with the last value the range holds for it."""
        s = scheduler(max_items=2)
        s.start_replay("range", None, now=0.0)
        sent: list[dict[str, Any]] = []
        position = 0
        seq = 0
        for size in slices:
            for id_, value in changes[position : position + size]:
                seq += 1
                s.add(change(id_, seq, extra1=str(value)), 0.0)
            position += size
            while isinstance(batch := s.next_batch(0.0), Batch):
                sent += [e.fields for e in batch.entries]
                s.resolve(batch, applied(), 0.0)
        for id_, value in changes[position:]:
            s.add(change(id_, None, extra1=str(value)), 0.0)
        assert [] == sent
        s.end_replay("range", now=0.0)
        sent_bodies = [body for body in _drain(s)]
        last = {str(id_): str(value) for id_, value in changes}
        assert sorted(last.items()) == sorted((str(b["ID"]), b["extra1"]) for b in sent_bodies)


def _drain(s: Scheduler) -> list[dict[str, Any]]:
    bodies: list[dict[str, Any]] = []
    while isinstance(batch := s.next_batch(0.0), Batch):
        bodies += [e.fields for e in batch.entries]
        s.resolve(batch, applied(), 0.0)
    return bodies
