"""Partitioning by ID, and forgetting a lost partition's waiting changes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from worker.core.change import Change
from worker.core.coalesce import Coalescer
from worker.core.partition import partition_mismatch, partition_of


class TestPartitionOf:
    def test_known_values(self) -> None:
        """The hash is CRC-32 of the UTF-8 ID: fixed values any producer can check against."""
        assert [partition_of(k, 8) for k in ("1", "123", "abc")] == [
            0x83DCEFB7 % 8,
            0x884863D2 % 8,
            0x352441C2 % 8,
        ]

    @given(st.text(min_size=1), st.integers(min_value=1, max_value=64))
    def test_in_range_and_stable(self, key: str, partitions: int) -> None:
        """Every ID maps to one partition in range, the same every time."""
        p = partition_of(key, partitions)
        assert 0 <= p < partitions
        assert p == partition_of(key, partitions)


def change(key: str, n: int) -> Change:
    return Change(key, {"ID": key, "extra1": str(n)}, (key, n))


class TestForget:
    def test_forgets_waiting_changes_of_the_selected_ids_only(self) -> None:
        """Waiting changes of dropped IDs vanish (ready or behind an in-flight request); the
        others and the in-flight request stay, and order among the rest is kept."""
        c = Coalescer()
        for i, key in enumerate(["a", "b", "c", "d"]):
            c.add(change(key, i), 0.0)
        in_flight = c.pop()  # "a"
        c.add(change("a", 9), 0.0)  # waits behind the in-flight request
        forgotten = c.forget(lambda key: key in ("a", "c"))
        assert {"a", "c"} == {e.key for e in forgotten}
        assert 2 == c.changes_waiting
        assert ["b", "d"] == [c.pop().key, c.pop().key]
        assert None is c.peek()
        assert c.is_in_flight(in_flight.key)
        c.release("a")
        assert None is c.peek()  # its newer change was forgotten with the partition

    def test_an_id_can_come_back_after_being_forgotten(self) -> None:
        """A change to a forgotten ID (partition regained) is sent once, not twice."""
        c = Coalescer()
        c.add(change("a", 1), 0.0)
        c.forget(lambda key: True)
        c.add(change("a", 2), 0.0)
        assert "a" == c.pop().key
        c.add(change("a", 3), 0.0)
        assert None is c.peek()  # "a" is in flight: its new change waits


class TestPartitionMismatch:
    def test_right_partition_is_no_problem_another_names_both(self) -> None:
        """A change in its ID's partition belongs there; in another, the problem names the
        ID, the partition it belongs to and the one it was filed in."""
        right = partition_of("123", 6)
        assert None is partition_mismatch("123", right, 6, "stream s:4")
        wrong = (right + 1) % 6
        problem = partition_mismatch("123", wrong, 6, f"stream s:{wrong}")
        assert problem is not None
        assert f"ID '123' belongs to partition {right} of 6" in problem
        assert f"stream s:{wrong} (partition {wrong})" in problem
