"""Retry delays: capped exponential backoff with full jitter, Retry-After honoured (DESIGN 5)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.core.backoff import MAX_RETRY_AFTER_S, Backoff

RAND = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


class TestBackoff:
    """The delay before the n-th retry, given the random draw ``rand`` in [0, 1)."""

    @pytest.mark.parametrize(
        ("attempt", "ceiling"), [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (9, 25.6)]
    )
    def test_ceiling_doubles_per_attempt(self, attempt: int, ceiling: float) -> None:
        """The jitter's ceiling is base * 2**(attempt-1); rand scales it (full jitter)."""
        backoff = Backoff(base_s=0.1, cap_s=30.0)
        assert pytest.approx(ceiling / 2) == backoff.delay(attempt, 0.5)
        assert 0.0 == backoff.delay(attempt, 0.0)

    @pytest.mark.parametrize("attempt", [10, 11, 50, 1000, 10**9])
    def test_capped(self, attempt: int) -> None:
        """Past the cap the ceiling stays at cap_s, however many attempts (no overflow)."""
        assert pytest.approx(15.0) == Backoff(base_s=0.1, cap_s=30.0).delay(attempt, 0.5)

    def test_retry_after_is_a_floor(self) -> None:
        """With Retry-After the delay is that wait plus at most one base of jitter."""
        backoff = Backoff(base_s=0.1, cap_s=30.0)
        assert 7.0 == backoff.delay(1, 0.0, retry_after_s=7.0)
        assert pytest.approx(7.05) == backoff.delay(1, 0.5, retry_after_s=7.0)

    def test_retry_after_above_the_cap_is_honoured(self) -> None:
        """The backoff cap does not cut the server's wish short."""
        assert 120.0 == Backoff(base_s=0.1, cap_s=30.0).delay(1, 0.0, retry_after_s=120.0)

    def test_retry_after_zero(self) -> None:
        """Retry-After 0 still gets a little jitter, never less than nothing."""
        assert pytest.approx(0.05) == Backoff(base_s=0.1).delay(3, 0.5, retry_after_s=0.0)

    @pytest.mark.parametrize("huge", [300.5, 3600.5, 86400.0, 1e12, float("inf")])
    def test_huge_retry_after_is_capped_at_five_minutes(self, huge: float) -> None:
        """A server asking for more than --max-retry-after (default five minutes) is taken
        to mean that much."""
        assert 300.0 == MAX_RETRY_AFTER_S
        assert MAX_RETRY_AFTER_S == Backoff().delay(1, 0.0, retry_after_s=huge)

    def test_max_retry_after_is_a_setting(self) -> None:
        """--max-retry-after sets the cap: 20 s caps a 60 s wish, not a 10 s one."""
        backoff = Backoff(max_retry_after_s=20.0)
        assert 20.0 == backoff.delay(1, 0.0, retry_after_s=60.0)
        assert 10.0 == backoff.delay(1, 0.0, retry_after_s=10.0)

    @settings(max_examples=300, deadline=None)
    @given(st.integers(1, 200), RAND, st.floats(0.001, 5.0), st.floats(0.01, 600.0))
    def test_full_jitter_bounds(self, attempt: int, rand: float, base: float, cap: float) -> None:
        """0 <= delay < min(cap, base * 2**(attempt-1)), and it grows with rand."""
        backoff = Backoff(base_s=base, cap_s=cap)
        ceiling = min(cap, base * 2.0 ** (attempt - 1))
        delay = backoff.delay(attempt, rand)
        assert 0.0 <= delay <= ceiling
        assert delay < ceiling or rand == 0.0 or ceiling == 0.0
        assert delay <= backoff.delay(attempt, (1.0 + rand) / 2)

    @settings(max_examples=300, deadline=None)
    @given(st.integers(1, 200), RAND, st.floats(0.0, 1e9, allow_nan=False))
    def test_retry_after_bounds(self, attempt: int, rand: float, retry_after: float) -> None:
        """min(Retry-After, the cap) <= delay < that + base, whatever the attempt."""
        backoff = Backoff(base_s=0.1, cap_s=30.0)
        floor = min(retry_after, MAX_RETRY_AFTER_S)
        delay = backoff.delay(attempt, rand, retry_after)
        assert floor <= delay <= floor + 0.1
