"""``--rate auto``: learn the API's rate limit from its answers (pure; ``now`` comes in).

What it borrows, and from where:

* **AIMD, as TCP** (Jacobson 1988; RFC 5681): grow while answers are 2xx, cut
  multiplicatively on a 429, at most once per round (here: once per ``cut_interval_s``, so the
  answers of requests already in flight when the first 429 came do not cut again). Growth
  starts as TCP's slow start (the rate doubles each second) until the first 429.
* **CUBIC's remembered ceiling** (RFC 8312): the rate at which the API answered 429 is kept as
  the *limit*; after a cut the rate goes back to just under it quickly, and only then probes
  above it, slowly. A plain AIMD sawtooth averages three quarters of the limit; holding just
  under a remembered limit keeps 0.97 of it.
* **Probing, as BBR and Netflix's concurrency-limits (Gradient2)**: the limit is raised by a
  small step after holding just under it for ``probe_every_s`` without a 429; a probe that
  fails (the 429 comes within it) doubles the wait before the next one, so an API that
  counts strictly is not poked every few seconds.
* **Only grow when the rate binds** (RFC 7661's "cwnd validation", Vector's adaptive request
  concurrency, which also only raises its limit when the limit was reached): a worker with
  little to send learns nothing about the limit and must not creep upwards.
* **The API's own words first**: a ``RateLimit-Policy`` (IETF draft
  ``draft-ietf-httpapi-ratelimit-headers``: ``10;w=1``, or ``"default";q=10;w=1``) says the
  limit exactly: the rate is set to it and no probing is done. ``RateLimit``/``RateLimit-*``/
  ``X-RateLimit-*`` with nothing remaining pause every sender until the window resets, before
  any 429.

Google SRE's client-side throttling (accepts vs requests) guards a backend against overload
from many clients; here the one client meets a fixed quota, so the quota is learned instead.
After a pause (``Retry-After``), the senders resume at the learned rate, one slot at a time
(``worker.core.rate.Schedule.pause_until``): no re-burst.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

RATE_HEADERS = (
    "RateLimit",
    "RateLimit-Policy",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
)
"""The rate-limit headers the worker reads (the sender keeps only these)."""


@dataclass(frozen=True, slots=True)
class AdaptSettings:
    """How ``--rate auto`` moves."""

    max_rate: float = 200.0
    """--max-rate: never above."""
    start_rate: float = 2.0
    """Where slow start begins (requests/s)."""
    min_rate: float = 0.1
    hold: float = 0.97
    """The share of the remembered limit held between probes."""
    cut: float = 0.9
    """The multiplicative decrease on a 429 once a limit is remembered."""
    first_cut: float = 0.5
    """The decrease on the first 429 (slow start overshoots up to twice the limit)."""
    cut_again: float = 0.7
    again_within_s: float = 2.5
    """A 429 this soon after the last cut (it was not enough: 429s go on) cuts by
    ``cut_again``: a rate far above the limit (replicas' slow starts) comes down in seconds."""
    cut_interval_s: float = 1.0
    """At most one cut per interval: the answers of requests already in flight are one round."""
    approach_s: float = 2.0
    """After a cut, the rate closes the gap to the held rate with this time constant."""
    probe_every_s: float = 15.0
    probe_step: float = 0.02
    max_probe_every_s: float = 240.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_rate) and self.max_rate > 0):
            raise ValueError(f"max_rate must be > 0, got {self.max_rate}")


@dataclass(frozen=True, slots=True)
class RateHints:
    """What the API's rate-limit headers said."""

    policy_rate: float | None = None
    """The limit in requests/s a ``RateLimit-Policy`` states."""
    exhausted_for_s: float | None = None
    """Nothing remains in the API's window: seconds until it resets."""


_POLICY_Q = re.compile(r"(?:^|;)\s*q\s*=\s*(\d+(?:\.\d+)?)")
_POLICY_W = re.compile(r"(?:^|;)\s*w\s*=\s*(\d+(?:\.\d+)?)")
_ITEM = re.compile(r"(limit|remaining|reset|r|t)\s*=\s*(\d+(?:\.\d+)?)")


def _policy_rate(value: str) -> float | None:
    """Requests/s of the strictest policy in a ``RateLimit-Policy`` value."""
    best: float | None = None
    for item in value.split(","):
        item = item.strip()
        bare = re.match(r"^(\d+(?:\.\d+)?)\s*(;|$)", item)  # the older draft: 10;w=1
        quota = _POLICY_Q.search(item)
        amount = float(bare.group(1)) if bare else float(quota.group(1)) if quota else None
        window = _POLICY_W.search(item)
        if amount is None or amount <= 0:
            continue
        rate = amount / (float(window.group(1)) if window and float(window.group(1)) > 0 else 1.0)
        best = rate if best is None else min(best, rate)
    return best


def _reset_s(value: str, now_epoch_s: float) -> float | None:
    try:
        reset = float(value)
    except ValueError:
        return None
    if reset > 1e9:  # an epoch time (GitHub's X-RateLimit-Reset), not delta-seconds
        reset -= now_epoch_s
    return max(0.0, reset)


def read_hints(headers: Mapping[str, str], now_epoch_s: float) -> RateHints:
    """The policy and the window's state from the rate-limit headers (names case-blind)."""
    lower = {name.lower(): value for name, value in headers.items()}
    policy = lower.get("ratelimit-policy") or lower.get("x-ratelimit-policy")
    policy_rate = _policy_rate(policy) if policy else None
    remaining: float | None = None
    reset: float | None = None
    combined = lower.get("ratelimit")
    if combined:  # the draft's one header: limit=10, remaining=0, reset=1 (or r=0;t=1)
        items = dict(_ITEM.findall(combined.lower()))
        left = items.get("remaining", items.get("r"))
        until = items.get("reset", items.get("t"))
        remaining = float(left) if left is not None else None
        reset = _reset_s(until, now_epoch_s) if until is not None else None
    for prefix in ("ratelimit-", "x-ratelimit-"):
        if remaining is None and prefix + "remaining" in lower:
            try:
                remaining = float(lower[prefix + "remaining"])
            except ValueError:
                remaining = None
        if reset is None and prefix + "reset" in lower:
            reset = _reset_s(lower[prefix + "reset"], now_epoch_s)
    exhausted = reset if remaining is not None and remaining <= 0 and reset else None
    return RateHints(policy_rate, exhausted)


@dataclass(frozen=True, slots=True)
class AdaptStatistics:
    """The controller's state, for ``/metrics`` and the ``progress`` events."""

    rate: float
    limit: float | None
    """The remembered limit (None: no 429 and no policy yet)."""
    cuts: int
    probes: int
    from_policy: bool


class RateController:
    """Moves the rate from the API's answers; the engine hands the limiter :attr:`rate`."""

    def __init__(self, settings: AdaptSettings, now: float) -> None:
        self.settings = settings
        self.rate = min(settings.start_rate, settings.max_rate)
        self.limit: float | None = None
        self.from_policy = False
        self.cuts = 0
        self.probes = 0
        self._last_move = now
        self._last_cut = -math.inf
        self._probe_every = settings.probe_every_s
        self._held_since: float | None = None
        self._probing_since: float | None = None
        self._before_probe = 0.0

    def _held(self) -> float:
        s = self.settings
        assert self.limit is not None
        return min(s.max_rate, self.limit * (1.0 if self.from_policy else s.hold))

    def answered(self, now: float, *, binding: bool, hints: RateHints | None = None) -> float:
        """A 2xx (or any answer that is not a 429): grow if the rate binds; the new rate."""
        s = self.settings
        dt = max(0.0, now - self._last_move)
        self._last_move = now
        if hints is not None and hints.policy_rate is not None:
            self._policy(hints.policy_rate)
            return self.rate
        if not binding or self.from_policy:
            return self.rate
        if self.limit is None:  # slow start: double each second
            self.rate = min(s.max_rate, self.rate * 2.0 ** min(dt, 1.0))
            return self.rate
        held = self._held()
        if self.rate < held:  # back to just under the limit, quickly
            self.rate = min(held, self.rate + (held - self.rate) * min(1.0, dt / s.approach_s))
            if held - self.rate < 0.01 * held:
                self.rate = held
            self._held_since = None
            return self.rate
        if self._probing_since is not None:
            if now - self._probing_since >= self._probe_every:  # the probe held: keep it
                self._probing_since = None
                self._held_since = now
            return self.rate
        if self._held_since is None:
            self._held_since = now
        elif now - self._held_since >= self._probe_every and self.rate < s.max_rate:
            self._before_probe = self.limit
            self.limit *= 1.0 + s.probe_step
            self.rate = self._held()
            self.probes += 1
            self._probing_since = now
            self._held_since = None
        return self.rate

    def throttled(self, now: float, hints: RateHints | None = None) -> float:
        """A 429: remember the limit and cut (once per round); the new rate."""
        s = self.settings
        self._last_move = now
        if hints is not None and hints.policy_rate is not None:
            self._policy(hints.policy_rate)
            return self.rate
        if now - self._last_cut < s.cut_interval_s:
            return self.rate
        again = now - self._last_cut < s.again_within_s  # the last cut was not enough
        self._last_cut = now
        self.cuts += 1
        first = self.limit is None
        if self._probing_since is not None:  # the probe failed: undo it, probe less often
            self._probe_every = min(s.max_probe_every_s, self._probe_every * 2.0)
            self._probing_since = None
            self.limit = self._before_probe
        elif first:
            self.limit = self.rate
        else:  # the held rate itself was too much: step back below it
            self.limit = min(self.rate, self.limit or self.rate) * (1.0 - s.probe_step)
        cut = s.first_cut if first else s.cut_again if again else s.cut
        self.rate = max(s.min_rate, self.rate * cut)
        self._held_since = None
        return self.rate

    def adopt(self, rate: float) -> float:
        """Another replica sharing the account's schedule moved the rate: take it as ours.
        A lower one means it met a 429 at the account's rate, which counts as ours: the limit
        comes down as :meth:`throttled` brings it down (slow start ends). The new rate."""
        s = self.settings
        rate = max(s.min_rate, min(s.max_rate, rate))
        if rate > self.rate and self.limit is None:
            return self.rate  # in slow start each doubles its own: taking theirs compounds
        if rate < self.rate:
            if self.limit is None:
                self.limit = self.rate
            else:
                self.limit = min(self.rate, self.limit) * (1.0 - s.probe_step)
            self._probing_since = self._held_since = None
        self.rate = rate
        return rate

    def _policy(self, rate: float) -> None:
        self.limit = rate
        self.from_policy = True
        self.rate = max(self.settings.min_rate, min(self.settings.max_rate, rate))

    def statistics(self) -> AdaptStatistics:
        """The rate, the remembered limit, cuts and probes so far."""
        return AdaptStatistics(self.rate, self.limit, self.cuts, self.probes, self.from_policy)
