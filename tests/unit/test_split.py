"""Isolation plans: how a refused batch is split until its culprits stand alone (DESIGN 4)."""

from __future__ import annotations

import itertools

from tests.unit.factories import entries, entry, not_found, rejected, too_large
from worker.core.batch import Batch, Purpose
from worker.core.split import DeadLetter, culprit, halves, release_held, split_known_bad


def numbers() -> itertools.count[int]:
    """Batch numbers from 100 up."""
    return itertools.count(100)


class TestSplitKnownBad:
    """Entries known to hold a culprit: a lone one is the culprit, else send a half, hold one."""

    def test_lone_entry_is_the_culprit(self) -> None:
        """One entry known bad is dead-lettered with the failure's reason, code and message."""
        lone = entry("9")
        counter = numbers()
        plan = split_known_bad([lone], not_found(), counter.__next__)
        assert DeadLetter(lone, "not_found", 404, "404", "Contact not found") == plan
        assert 100 == next(counter)  # no batch number spent

    def test_lone_rejected_entry(self) -> None:
        """A rejected culprit keeps the API's code and message."""
        lone = entry("9")
        plan = split_known_bad([lone], rejected(), numbers().__next__)
        assert DeadLetter(lone, "rejected", 400, "139", "Missing or invalid parameters") == plan

    def test_halves_first_sent_second_held(self) -> None:
        """Several entries: the first half is the batch to send, the second half is held."""
        batch = split_known_bad(entries("1", "2", "3", "4"), not_found(), numbers().__next__)
        assert isinstance(batch, Batch)
        assert batch.held is not None
        assert (["1", "2"], ["3", "4"]) == (batch.keys, batch.held.keys)
        assert (Purpose.ISOLATE, Purpose.ISOLATE) == (batch.purpose, batch.held.purpose)
        assert (not_found(), not_found()) == (batch.failure, batch.held.failure)
        assert None is batch.held.held

    def test_odd_count_holds_the_larger_half(self) -> None:
        """An odd count sends the smaller half first."""
        batch = split_known_bad(entries("1", "2", "3"), rejected(), numbers().__next__)
        assert isinstance(batch, Batch) and batch.held is not None
        assert (["1"], ["2", "3"]) == (batch.keys, batch.held.keys)

    def test_two_entries(self) -> None:
        """Two entries: one sent, one held."""
        batch = split_known_bad(entries("1", "2"), not_found(), numbers().__next__)
        assert isinstance(batch, Batch) and batch.held is not None
        assert (["1"], ["2"]) == (batch.keys, batch.held.keys)

    def test_batches_get_fresh_numbers(self) -> None:
        """Each half gets its own number from the counter."""
        batch = split_known_bad(entries("1", "2"), not_found(), numbers().__next__)
        assert isinstance(batch, Batch) and batch.held is not None
        assert {100, 101} == {batch.number, batch.held.number}

    def test_same_entries_no_copies(self) -> None:
        """The halves hold the very entries (tokens and all), in order."""
        items = entries("1", "2", "3", "4", "5")
        batch = split_known_bad(items, not_found(), numbers().__next__)
        assert isinstance(batch, Batch) and batch.held is not None
        assert all(a is b for a, b in zip(items, batch.entries + batch.held.entries, strict=True))


class TestReleaseHeld:
    """The held half, sent as it is once the first half failed too."""

    def test_hands_over_and_forgets_the_held_half(self) -> None:
        """The held half comes back once; the batch no longer holds it."""
        batch = split_known_bad(entries("1", "2"), not_found(), numbers().__next__)
        assert isinstance(batch, Batch)
        held = batch.held
        assert held is release_held(batch)
        assert None is batch.held
        assert None is release_held(batch)

    def test_nothing_held(self) -> None:
        """A batch holding nothing releases nothing."""
        assert None is release_held(Batch(entries("1"), 1))


class TestHalves:
    """A batch refused as too large: both halves are sent."""

    def test_both_halves_to_send(self) -> None:
        """Both halves are SHRINK batches, in order, nothing held."""
        parts = halves(Batch(entries("1", "2", "3", "4", "5"), 1), numbers().__next__)
        assert [["1", "2"], ["3", "4", "5"]] == [p.keys for p in parts]
        assert [Purpose.SHRINK, Purpose.SHRINK] == [p.purpose for p in parts]
        assert [None, None] == [p.held for p in parts]
        assert [100, 101] == [p.number for p in parts]


class TestCulprit:
    """The dead letter of a lone entry found failing."""

    def test_shrink_culprit_is_rejected(self) -> None:
        """A lone entry too large is rejected with the 413."""
        lone = entry("1")
        assert DeadLetter(lone, "rejected", 413, None, None) == culprit(lone, too_large())


class TestSplitWithRiders:
    """A refused step that carried riders: its core is halved, its riders (the pad) stay with
    the held part; a core of one sends the pad."""

    def test_core_halved_pad_held(self) -> None:
        """Core 1-4 and pad 5-6: the first half of the core goes; the held part is the other
        half and the pad, which it keeps as its riders."""
        batch = split_known_bad(
            entries("1", "2", "3", "4", "5", "6"), not_found(), numbers().__next__, riders=2
        )
        assert isinstance(batch, Batch) and batch.held is not None
        assert (["1", "2"], 0) == (batch.keys, batch.riders)
        assert (["3", "4", "5", "6"], 2) == (batch.held.keys, batch.held.riders)
        assert ["3", "4"] == [e.key for e in batch.held.core]
        assert (False, False) == (batch.no_riders, batch.held.no_riders)

    def test_core_of_one_sends_the_pad(self) -> None:
        """Core 1 and pad 5-7: the pad goes, without riders; the core's entry is held (the
        culprit if the pad is applied)."""
        batch = split_known_bad(
            entries("1", "5", "6", "7"), not_found(), numbers().__next__, riders=3
        )
        assert isinstance(batch, Batch) and batch.held is not None
        assert (["5", "6", "7"], 0, True) == (batch.keys, batch.riders, batch.no_riders)
        assert (["1"], 0) == (batch.held.keys, batch.held.riders)

    def test_a_search_in_a_pad_takes_no_riders(self) -> None:
        """Both parts of a search without riders are without riders."""
        batch = split_known_bad(
            entries("1", "2", "3"), not_found(), numbers().__next__, no_riders=True
        )
        assert isinstance(batch, Batch) and batch.held is not None
        assert (True, True) == (batch.no_riders, batch.held.no_riders)

    def test_one_entry_is_the_culprit_whatever_it_was(self) -> None:
        """A lone entry is the culprit, even counted as a rider."""
        lone = entry("9")
        plan = split_known_bad([lone], not_found(), numbers().__next__, riders=1)
        assert DeadLetter(lone, "not_found", 404, "404", "Contact not found") == plan

    def test_known_to_exist_ordering_is_of_the_core(self) -> None:
        """The fresh part of the core is halved (IDs known to exist almost never fail); the
        pad is not looked at."""
        known = {"3", "4"}
        batch = split_known_bad(
            entries("1", "2", "3", "4", "5", "6"),
            not_found(),
            numbers().__next__,
            known.__contains__,
            riders=2,
        )
        assert isinstance(batch, Batch) and batch.held is not None
        assert (["1"], ["2", "3", "4", "5", "6"]) == (batch.keys, batch.held.keys)
