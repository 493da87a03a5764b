"""How many requests may be in flight: a fixed number, or one that adapts (``--concurrency auto``).

The adaptive limit is AIMD on the round-trip time, in the manner of Vector's adaptive request
concurrency and TCP Vegas, with Netflix concurrency-limits' gradient for the decrease:

- **Grow while latency-bound.** A request that went out with the limit used in full (as many in
  flight as the limit allows, or half of it with a full batch more waiting) says that more in
  flight would carry more: by Little's law, in
  flight = rate x latency, and the latency does not depend on the concurrency while the API
  keeps up. The limit starts at 8 (the fixed default) and grows by one per such answer until
  the first decrease (a slow start that doubles it per round trip), then by one per round trip.
- **Shrink when latency rises or requests fail.** The baseline is a slow average of the round
  trip; when the recent average exceeds ``tolerance`` times it, the API queues: the limit is
  cut by the ratio (at most to half), once per round trip. A timeout, a lost connection or a
  5xx cuts it to ``backoff_ratio`` of itself, once per round trip.
- **The rate limiter binds first.** A request that had to wait for the rate limiter before it
  went out says that the rate, not the concurrency, limits: more senders would only wait
  longer; such answers never grow the limit. With a rate known, the limit never grows past
  what Little's law says the rate needs (rate x recent latency, with ``headroom``).

Pure: the engine reports each answer with ``now``; nothing here waits or reads a clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_MAX_CONCURRENCY = 64
"""The ceiling of ``--concurrency auto`` unless ``--max-concurrency`` says otherwise."""


@dataclass(frozen=True, slots=True)
class AdaptiveSettings:
    """The adaptive limit's knobs (the defaults are what ``--concurrency auto`` uses)."""

    max_limit: int = DEFAULT_MAX_CONCURRENCY
    min_limit: int = 1
    initial: int = 8
    """Where the limit starts: the fixed default of ``--concurrency``."""
    tolerance: float = 2.0
    """The recent round trip may reach this many times the baseline before the limit shrinks."""
    backoff_ratio: float = 0.75
    """What a failure (timeout, lost connection, 5xx) leaves of the limit."""
    recent_weight: float = 0.2
    """Weight of each answer in the recent round-trip average."""
    baseline_weight: float = 0.01
    """Weight of each answer in the baseline (about the last 100 answers)."""
    headroom: float = 1.5
    """With a rate known: the limit stays within rate x recent round trip x this, plus one."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One answered (or failed) request, as the engine saw it."""

    rtt_s: float
    in_flight: int
    """Requests in flight when it went out, itself included."""
    limit: int
    """The limit when it went out."""
    rate_waited: bool = False
    """It waited for the rate limiter before it went out (the rate binds)."""
    failed: bool = False
    """A timeout, a lost connection or a 5xx: the API is overloaded or away."""
    queued: bool = False
    """A full batch more was ready to go when it went out: work waited for the limit."""


@dataclass(frozen=True, slots=True)
class LimitStatistics:
    """The controller's state, for ``/metrics`` and the ``progress`` events."""

    limit: int
    recent_rtt_s: float
    baseline_rtt_s: float
    increases: int
    decreases: int
    highest: int
    """The highest limit any answer left."""


class AdaptiveLimit:
    """The adaptive concurrency limit; :attr:`limit` is the requests that may be in flight."""

    def __init__(self, settings: AdaptiveSettings | None = None) -> None:
        self.settings = s = settings or AdaptiveSettings()
        if not 1 <= s.min_limit <= s.max_limit:
            raise ValueError("need 1 <= min_limit <= max_limit")
        self._limit = float(min(max(s.initial, s.min_limit), s.max_limit))
        self._recent_s = 0.0
        self._baseline_s = 0.0
        self._slow_start = True
        self._hold_until = -math.inf
        """No second decrease before this time: one cut per round trip."""
        self.increases = 0
        self.decreases = 0
        self.highest = 0
        """The highest limit any answer left (the start not counted)."""

    @property
    def limit(self) -> int:
        """Requests that may be in flight now."""
        return int(self._limit)

    def answered(self, sample: Sample, now: float, rate_per_s: float | None = None) -> int:
        """Take one answer into account; the limit after it. ``rate_per_s``: the rate limit
        in force, if any (the limit stays within what it needs)."""
        s = self.settings
        rtt = max(0.0, sample.rtt_s)
        if self._baseline_s == 0.0:
            self._recent_s = self._baseline_s = rtt
        else:
            self._recent_s += s.recent_weight * (rtt - self._recent_s)
            self._baseline_s += s.baseline_weight * (rtt - self._baseline_s)
        if sample.failed:
            self._decrease(s.backoff_ratio, now)
        elif self._recent_s > s.tolerance * self._baseline_s > 0.0:
            self._decrease(max(0.5, s.tolerance * self._baseline_s / self._recent_s), now)
        elif not sample.rate_waited and self._bound(sample):
            self._increase()
        if rate_per_s is not None and rate_per_s > 0:
            needed = rate_per_s * self._recent_s * s.headroom + 1.0
            if self._limit > needed:
                self._limit = max(float(s.min_limit), min(self._limit, math.ceil(needed)))
        self.highest = max(self.highest, self.limit)
        return self.limit

    @staticmethod
    def _bound(sample: Sample) -> bool:
        """Whether the limit held this request's work back: it went out with the limit used
        in full (less one: when an answer raises the limit, the request sent first after it
        goes out before the answered one's slot is given back), or with at least half of it
        used while a full batch more was waiting (answers come in bursts, and the requests
        they free go out one by one: the first ones see few in flight under a limit that
        the burst already raised)."""
        if sample.in_flight + 1 >= sample.limit:
            return True
        return sample.queued and 2 * sample.in_flight >= sample.limit

    def _increase(self) -> None:
        s = self.settings
        if self._limit >= s.max_limit:
            return
        step = 1.0 if self._slow_start else 1.0 / self._limit
        self._limit = min(float(s.max_limit), self._limit + step)
        self.increases += 1

    def _decrease(self, ratio: float, now: float) -> None:
        if now < self._hold_until:
            return
        self._slow_start = False
        self._limit = max(float(self.settings.min_limit), self._limit * ratio)
        self._hold_until = now + max(self._recent_s, 1e-3)
        self.decreases += 1

    def statistics(self) -> LimitStatistics:
        """The limit, the round-trip averages, and how often it moved."""
        return LimitStatistics(
            self.limit,
            self._recent_s,
            self._baseline_s,
            self.increases,
            self.decreases,
            self.highest,
        )
