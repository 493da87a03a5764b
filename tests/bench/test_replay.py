"""Replaying an input through the worker's pure core against a pure model of the API."""

from __future__ import annotations

import orjson

from worker.bench.bounds import PLAIN, halving_requests, splitting_requests
from worker.bench.figures import known_below
from worker.bench.replay import replay


def lines(*ids: int) -> list[bytes]:
    return [orjson.dumps({"ID": i, "lastname": f"n{n}"}) for n, i in enumerate(ids)]


class TestReplay:
    def test_clean_input_is_one_request_per_batch(self) -> None:
        """No unknown IDs: ceil(distinct / B) requests, changes to one ID merged."""
        result = replay(lines(*range(1, 21), 5, 6), known_below(100), batch_size=8)
        assert (result.requests, result.new_batches, result.contacts) == (3, 3, 20)
        assert result.plain_halving_requests == 3

    def test_one_batch_with_culprits_matches_the_halving_counts(self) -> None:
        """One batch of 8 with an unknown last ID: the core's count and plain halving's."""
        result = replay(lines(1, 2, 3, 4, 5, 6, 7, 999), known_below(100), batch_size=8)
        flags = [False] * 7 + [True]
        assert result.requests == splitting_requests(flags, [8]) == 4
        assert result.plain_halving_requests == halving_requests(flags, PLAIN) == 7
        assert result.refused_batches == 1 and result.isolation_requests == 3

    def test_a_known_missing_id_costs_no_request_later(self) -> None:
        """An unknown ID seen again after the core learnt it is dead-lettered at once."""
        first = lines(1, 999)
        later = [orjson.dumps({"ID": 999, "lastname": "again"})]
        result = replay(first + later, known_below(100), batch_size=2, max_waiting=2)
        assert (1, 2) == (result.known_missing, result.requests)  # the group and 1 alone
        assert result.per_contact == result.requests / 2

    def test_invalid_lines_are_skipped(self) -> None:
        """Lines the worker would dead-letter as invalid never reach the core."""
        result = replay([b"not json", *lines(1)], known_below(100), batch_size=8)
        assert (result.requests, result.contacts) == (1, 1)
