"""The exact rate (DESIGN 10, issue 12 part 1): no one-second window holds more than R."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.core.rate import (
    JITTER_ALLOWANCE_S,
    NS_PER_S,
    Schedule,
    most_in_window,
    spacing_ns,
    to_ns,
)

RATES = st.one_of(
    st.integers(1, 500).map(float), st.floats(0.2, 500.0, allow_nan=False, allow_infinity=False)
)
"""Whole rates (the usual setting) and fractional ones: a fractional R keeps requests 1/R
apart, so a second holds at most ceil(R) of them (one for R < 1)."""


def _most(rate: float) -> int:
    return max(1, math.ceil(rate))


# Times senders ask at: increments in ns, from none (several senders at once) to seconds.
GAPS = st.lists(st.integers(0, 3 * NS_PER_S), min_size=1, max_size=400)


def _asks(gaps: list[int]) -> list[float]:
    out, t = [], 0
    for gap in gaps:
        t += gap
        out.append(t / NS_PER_S)
    return out


class TestWindow:
    """The promise, whatever the senders do: requests counted by ``take`` and ``reserve``."""

    @settings(max_examples=400, deadline=None)
    @given(RATES, GAPS)
    def test_take_never_puts_more_than_r_in_a_second(self, rate: float, gaps: list[int]) -> None:
        """Senders asking at any times, each retrying at the time ``wait_s`` names: no
        half-open second (nor 1 s + the jitter allowance) holds more than R requests."""
        schedule = Schedule(rate)
        sent: list[int] = []
        for now in _asks(gaps):
            tries = 0
            while not schedule.take(now):  # as the limiter does: sleep, ask again
                now += schedule.wait_s(now)
                tries += 1
                assert tries <= 3
            sent.append(to_ns(now))
        sent.sort()
        assert most_in_window(sent) <= _most(rate)
        window = NS_PER_S + round(JITTER_ALLOWANCE_S * NS_PER_S)
        assert most_in_window(sent, window) <= _most(rate)

    @settings(max_examples=300, deadline=None)
    @given(RATES, GAPS, st.lists(st.floats(0.0, 5.0), max_size=5))
    def test_reserve_and_pauses(self, rate: float, gaps: list[int], pauses: list[float]) -> None:
        """Slots booked ahead (shared limiter style), with pauses in between: the booked
        slots keep the window, and none falls in a pause."""
        schedule = Schedule(rate)
        slots: list[int] = []
        pause_at = {i * 7: p for i, p in enumerate(pauses)}
        paused: list[tuple[float, float]] = []
        for i, now in enumerate(_asks(gaps)):
            if i in pause_at:
                schedule.pause_until(now + pause_at[i])
                paused.append((now, now + pause_at[i]))
            slot = schedule.reserve(now)
            assert slot >= now
            for _start, end in paused:  # every pause began before this ask
                assert slot >= end - 1e-9  # (1 ns: the slot is kept in whole ns)
            slots.append(to_ns(slot))
        assert most_in_window(sorted(slots)) <= _most(rate)

    def test_smooth_from_the_start(self) -> None:
        """No burst at start: at 10/s, ten senders asking at once go 101 ms apart (a full
        token bucket would let all ten go at once)."""
        schedule = Schedule(10.0)
        assert schedule.take(0.0)
        assert not schedule.take(0.0)
        assert pytest.approx(0.101) == schedule.wait_s(0.0)
        assert schedule.take(0.101)

    def test_pause_then_resume_one_by_one(self) -> None:
        """After a pause the senders come out one slot apart, not all at once."""
        schedule = Schedule(5.0)
        assert schedule.take(0.0)
        schedule.pause_until(3.0)
        assert pytest.approx(2.0) == schedule.wait_s(1.0)
        assert schedule.take(3.0)
        assert not schedule.take(3.0)
        assert pytest.approx(0.202) == schedule.wait_s(3.0)

    def test_rate_change_moves_the_next_slot(self) -> None:
        """A lower rate (--rate auto cut it) spaces the next request by the new spacing."""
        schedule = Schedule(10.0)
        assert schedule.take(0.0)
        schedule.set_rate(2.0, 0.0)
        assert pytest.approx(0.505) == schedule.wait_s(0.0)

    @pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
    def test_bad_rate(self, bad: float) -> None:
        """A rate must be finite and > 0 (0, no limit, means no schedule at all)."""
        with pytest.raises(ValueError, match="rate must be"):
            spacing_ns(bad)

    def test_most_in_window(self) -> None:
        """The window counter is half-open: t and t + 1 s are in different windows."""
        assert 2 == most_in_window([0, NS_PER_S // 2, NS_PER_S])
        assert 1 == most_in_window([0, NS_PER_S, 2 * NS_PER_S])
