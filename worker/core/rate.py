"""An exact request rate: a smooth schedule (GCRA without burst), pauses, and its window promise.

``--rate R`` promises that the API never sees more than R requests from the worker in any one
second. A token bucket that starts full lets R requests go at once and then R more as it
refills: up to 2R in one second (what ``aiolimiter`` did). This schedule has no burst at all:
consecutive requests are at least ``spacing`` apart, where

    spacing = (1 s + JITTER_ALLOWANCE_S) / R

so that any window of ``1 s + JITTER_ALLOWANCE_S`` holds at most R requests. The allowance is
what the network may shift one request against another (or a sleep overshoot against the
next) without the API's one-second window seeing R + 1: 10 ms, costing 1 % of the rate.

The schedule is kept in integer nanoseconds, so the promise holds exactly (no float rounding
lets R + 1 requests into a window). Time comes in as ``now`` (seconds, any monotonic origin).

A pause (``Retry-After``: the API asked every sender to wait) moves the schedule's next slot to
the end of the pause: the senders then come out one at a time, ``spacing`` apart, at the rate
they had, instead of all at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NS_PER_S = 1_000_000_000
JITTER_ALLOWANCE_S = 0.01
"""How much the network (or a late wake-up) may shift a request against the next one without
the API ever counting R + 1 in one second: the schedule keeps R requests per 1.01 s."""
LATE_SLACK_S = 0.005
"""A request that goes this little after its slot keeps the schedule's grid (the next slot is
one spacing after the slot, not after the late request): a sender's sleep overshoots by a
fraction of a millisecond every time, which would otherwise cost 2 % of the rate at 100/s.
Half the jitter allowance: any window of 1.005 s still holds at most R requests."""


SHARED_LATE_SLACK_S = 0.02
"""How late after its booked slot a replica's request may still go, measured from when the
booking was *sent* (the store's answer can only have come later: the real slot is no earlier
than that estimate, so the measured lateness bounds the true one from above)."""
SHARED_ALLOWANCE_S = SHARED_LATE_SLACK_S + JITTER_ALLOWANCE_S / 2
"""The shared schedule keeps R requests per 1.025 s: a request late by up to
SHARED_LATE_SLACK_S, plus the network's share of the jitter, never makes R + 1 in a second."""


def to_ns(seconds: float) -> int:
    """Seconds as whole nanoseconds, rounded up (a slot is never early)."""
    return math.ceil(seconds * NS_PER_S)


def spacing_ns(rate_per_s: float, allowance_s: float = JITTER_ALLOWANCE_S) -> int:
    """The least gap between two requests at ``rate_per_s``, in whole nanoseconds (up), for
    R requests per ``1 + allowance_s`` seconds."""
    if not (math.isfinite(rate_per_s) and rate_per_s > 0):
        raise ValueError(f"rate must be a finite number > 0, got {rate_per_s}")
    window_ns = NS_PER_S + round(allowance_s * NS_PER_S)
    return max(1, math.ceil(window_ns / rate_per_s))


@dataclass(frozen=True, slots=True)
class ScheduleStatistics:
    """What the schedule did: for metrics and the ``progress`` events."""

    rate_per_s: float
    taken: int
    paused_until: float


class Schedule:
    """When the next request may go: at least ``spacing`` after the last, never in a pause.

    ``wait_s(now)`` says how long a request must wait; ``take(now)`` counts one that goes
    now (only if it may); ``reserve(now)`` books the next free slot and says when it is (for
    a sender that sleeps until then). Each of them is a pure state change, no I/O.
    """

    def __init__(self, rate_per_s: float) -> None:
        self._spacing_ns = spacing_ns(rate_per_s)
        self._slack_ns = min(self._spacing_ns // 2, round(LATE_SLACK_S * NS_PER_S))
        self._rate = rate_per_s
        self._next_ns: int | None = None
        """The earliest time the next request may go (None: the first may go at once)."""
        self._paused_ns = 0
        self._paused_until = 0.0
        self.taken = 0

    @property
    def rate_per_s(self) -> float:
        """The rate the schedule keeps now."""
        return self._rate

    def set_rate(self, rate_per_s: float, now: float) -> None:
        """Keep ``rate_per_s`` from now on: the next request goes the new spacing after the
        last one (``now`` is when the change was decided; the schedule needs no more)."""
        spacing = spacing_ns(rate_per_s)
        if self._next_ns is not None:
            last = self._next_ns - self._spacing_ns
            self._next_ns = last + spacing
        self._spacing_ns = spacing
        self._slack_ns = min(spacing // 2, round(LATE_SLACK_S * NS_PER_S))
        self._rate = rate_per_s

    def pause_until(self, until: float) -> None:
        """No request before ``until`` (the API asked for a pause); a later pause wins."""
        until_ns = to_ns(until)
        if until_ns > self._paused_ns:
            self._paused_ns = until_ns
            self._paused_until = until

    @property
    def paused_until(self) -> float:
        """The end of the latest pause (0: none yet)."""
        return self._paused_until

    def _due_ns(self) -> int:
        due = self._paused_ns
        if self._next_ns is not None and self._next_ns > due:
            due = self._next_ns
        return due

    def wait_s(self, now: float) -> float:
        """Seconds until a request may go (0.0: now)."""
        due = self._due_ns()
        now_ns = to_ns(now)
        return 0.0 if due <= now_ns else (due - now_ns) / NS_PER_S

    def take(self, now: float) -> bool:
        """Count a request that goes now, if it may; False (nothing counted) if it must wait."""
        now_ns = to_ns(now)
        due = self._due_ns()
        if due > now_ns:
            return False
        self._next_ns = max(due, now_ns - self._slack_ns) + self._spacing_ns
        self.taken += 1
        return True

    def reserve(self, now: float) -> float:
        """Book the next free slot (now or later) and return its time in seconds."""
        slot = max(self._due_ns(), to_ns(now))
        self._next_ns = slot + self._spacing_ns
        self.taken += 1
        return slot / NS_PER_S

    def statistics(self) -> ScheduleStatistics:
        """The rate, the requests counted, the end of the last pause."""
        return ScheduleStatistics(self._rate, self.taken, self._paused_until)


def rate_of(spacing_us: int, allowance_s: float = JITTER_ALLOWANCE_S) -> float:
    """The rate whose spacing (in microseconds) this is: :func:`spacing_ns`'s inverse."""
    window_ns = NS_PER_S + round(allowance_s * NS_PER_S)
    return window_ns / (max(1, spacing_us) * 1000)


def most_in_window(times_ns: list[int], window_ns: int = NS_PER_S) -> int:
    """The most of these (sorted) times that any half-open window ``[t, t + window)`` holds:
    what an API counting requests per second saw at worst."""
    most = 0
    start = 0
    for end, t in enumerate(times_ns):
        while t - times_ns[start] >= window_ns:
            start += 1
        most = max(most, end - start + 1)
    return most


def alone_wait(
    fallback: Schedule | None, rate_per_s: float, paused_until_s: float, now: float
) -> tuple[Schedule, float]:
    """While the shared schedule cannot be reached, a replica books from a schedule of its
    own (``fallback``, made here the first time) at the full rate: that schedule, and the
    seconds from ``now`` until the slot it booked."""
    if fallback is None:
        fallback = Schedule(rate_per_s)
    elif fallback.rate_per_s != rate_per_s:
        fallback.set_rate(rate_per_s, now)
    if paused_until_s > 0:
        fallback.pause_until(now + paused_until_s)
    return fallback, max(0.0, fallback.reserve(now) - now)
