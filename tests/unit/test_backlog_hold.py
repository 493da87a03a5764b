"""Reading a backlog ahead before sending it (issue 12, part 6): while the input holds more
readable now, new batches wait, so that an ID's later changes merge into its one request."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.factories import applied
from tests.unit.test_scheduler import feed, scheduler
from worker.core.batch import Batch
from worker.core.scheduler import READ_STALL_S, Scheduler


def drain(s: Scheduler, now: float) -> list[Batch]:
    """Every batch the scheduler hands out now, each answered 204 at once."""
    out = []
    while isinstance(batch := s.next_batch(now), Batch):
        out.append(batch)
        s.resolve(batch, applied(), now)
    return out


class TestReadAhead:
    def test_full_batches_wait_while_the_backlog_is_read(self) -> None:
        """A full batch is ready, but the input has more readable: nothing leaves; the
        scheduler asks again when the reader would have stalled."""
        s = scheduler(max_items=2, read_ahead_s=5.0)
        s.read_ahead(True, 1.0)
        feed(s, 1, 2, 3, 1, now=1.0)
        assert 1.0 + READ_STALL_S == s.next_batch(1.05)

    def test_no_wait_while_nothing_merged(self) -> None:
        """While no change of the backlog merged into a waiting one (IDs that do not repeat),
        reading ahead would save nothing: full batches leave at once."""
        s = scheduler(max_items=2, read_ahead_s=5.0)
        s.read_ahead(True, 1.0)
        feed(s, 1, 2, 3, now=1.0)
        assert isinstance(s.next_batch(1.05), Batch)

    def test_merges_before_the_backlog_do_not_count(self) -> None:
        """Only merges since the input's backlog began decide: older ones say nothing of it."""
        s = scheduler(max_items=2, read_ahead_s=5.0)
        feed(s, 1, 1, now=0.0)
        s.read_ahead(True, 1.0)
        feed(s, 2, 3, now=1.0)
        assert isinstance(s.next_batch(1.05), Batch)

    def test_later_changes_merge_into_the_one_request(self) -> None:
        """Changes read ahead merge: each ID goes out once, with its last values."""
        s = scheduler(max_items=2, read_ahead_s=5.0)
        s.read_ahead(True, 0.0)
        feed(s, 1, 2, 3, 3, now=0.0, value="a")
        assert [] == drain(s, 0.05)
        s.read_ahead(True, 0.06)
        feed(s, 3, 2, 1, now=0.06, value="b")
        assert [] == drain(s, 0.1)
        assert s.read_ahead(False, 0.1)  # the backlog is read: the read-ahead ends
        batches = drain(s, 0.3)
        assert [["1", "2"], ["3"]] == [b.keys for b in batches]
        assert all(e.fields["extra1"] == "b" for b in batches for e in b.entries)

    def test_a_full_scheduler_sends(self) -> None:
        """At --max-waiting, batches leave although more is readable: memory stays bounded."""
        s = scheduler(max_items=2, max_waiting=4, read_ahead_s=5.0)
        s.read_ahead(True, 0.0)
        feed(s, 1, 2, 3, 3, now=0.0)
        assert isinstance(s.next_batch(0.0), Batch)

    def test_draining_sends(self) -> None:
        """At the input's end (or shutdown) nothing waits for reading any more."""
        s = scheduler(max_items=2, read_ahead_s=5.0)
        s.read_ahead(True, 0.0)
        s.draining = True
        feed(s, 1, 2, 3, 3, now=0.0)
        assert isinstance(s.next_batch(0.0), Batch)

    def test_a_stalled_reader_ends_the_wait(self) -> None:
        """An input that said it had more and then took nothing in for READ_STALL_S (its
        last page was full, the next one empty) holds sending up no longer."""
        s = scheduler(max_items=2, read_ahead_s=5.0)
        s.read_ahead(True, 0.0)
        feed(s, 1, 2, 2, now=0.0)
        assert isinstance(s.next_batch(READ_STALL_S), Batch)

    def test_the_allowance_ends_the_wait(self) -> None:
        """An input slower to read than read_ahead_s does not hold sending up for longer."""
        s = scheduler(max_items=2, read_ahead_s=0.3)
        s.read_ahead(True, 0.0)
        feed(s, 1, 2, 2, now=0.0)
        for t in (0.0, 0.09, 0.18, 0.27):  # a slow reader, still taking records in
            s.read_ahead(True, t)
            assert not isinstance(s.next_batch(t), Batch)
        s.read_ahead(True, 0.3)
        assert isinstance(s.next_batch(0.3), Batch)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(1, 50), min_size=1, max_size=400), st.integers(1, 20))
    def test_a_backlog_read_ahead_goes_in_the_fewest_requests(
        self, ids: list[int], batch_size: int
    ) -> None:
        """However the backlog's changes fall over IDs, reading it ahead (within
        --max-waiting) once its changes merge sends each ID once: ceil(distinct / batch size)
        requests."""
        s = scheduler(max_items=batch_size, read_ahead_s=5.0, max_waiting=1_000)
        s.read_ahead(True, 0.0)
        feed(s, 0, 0)  # the backlog's first two changes merge
        sent = []
        for i, id_ in enumerate(ids):
            now = i * 1e-4
            s.read_ahead(True, now)
            feed(s, id_, now=now, value=str(i))
            sent += drain(s, now)
        s.draining = True  # the input ended
        sent += drain(s, 0.1)
        distinct = len({0, *ids})
        assert -(-distinct // batch_size) == len(sent)
        assert distinct == sum(len(b.entries) for b in sent)
