"""``--rate auto`` (issue 12 part 2): the controller alone, then against model APIs in time."""

from __future__ import annotations

import math
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.core.adapt import AdaptSettings, RateController, RateHints, read_hints
from worker.core.rate import Schedule

EPOCH = 1_800_000_000.0


class TestHints:
    """What the API's rate-limit headers say."""

    @pytest.mark.parametrize(
        ("policy", "rate"),
        [
            ("10;w=1", 10.0),
            ("100;w=60", 100 / 60),
            ('"default";q=20;w=1', 20.0),
            ('"burst";q=50;w=1, "day";q=86400;w=86400', 1.0),
            ("q=5", 5.0),
        ],
    )
    def test_policy(self, policy: str, rate: float) -> None:
        """RateLimit-Policy in the draft's older and newer forms; the strictest policy wins."""
        assert pytest.approx(rate) == read_hints({"RateLimit-Policy": policy}, EPOCH).policy_rate

    @pytest.mark.parametrize(
        "headers",
        [
            {"RateLimit": "limit=10, remaining=0, reset=3"},
            {"RateLimit": '"default";r=0;t=3'},
            {"RateLimit-Remaining": "0", "RateLimit-Reset": "3"},
            {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "3"},
            {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(EPOCH) + 3)},
        ],
    )
    def test_exhausted(self, headers: dict[str, str]) -> None:
        """Nothing remaining: the seconds until the window resets (delta or epoch time)."""
        assert pytest.approx(3.0) == read_hints(headers, EPOCH).exhausted_for_s

    @pytest.mark.parametrize(
        "headers",
        [
            {},
            {"X-RateLimit-Remaining": "4", "X-RateLimit-Reset": "3"},
            {"RateLimit": "limit=10, remaining=2, reset=1"},
            {"X-RateLimit-Remaining": "zero", "X-RateLimit-Reset": "soon"},
            {"RateLimit-Policy": "garbage"},
        ],
    )
    def test_nothing_to_act_on(self, headers: dict[str, str]) -> None:
        """Headers with something left, or unreadable ones, change nothing."""
        assert RateHints() == read_hints(headers, EPOCH)


class TestController:
    def test_slow_start_doubles_each_second_while_binding(self) -> None:
        """From the start rate, 2xx answers that bind double the rate each second."""
        c = RateController(AdaptSettings(start_rate=2.0), 0.0)
        for i in range(1, 11):
            c.answered(i * 0.1, binding=True)
        assert pytest.approx(4.0) == c.rate

    def test_no_growth_while_the_rate_does_not_bind(self) -> None:
        """A worker with little to send does not creep upwards."""
        c = RateController(AdaptSettings(start_rate=2.0), 0.0)
        for i in range(1, 100):
            c.answered(i * 0.1, binding=False)
        assert 2.0 == c.rate

    def test_first_429_halves_and_remembers(self) -> None:
        """The first 429 ends slow start: half the rate, the rate it came at is the limit."""
        c = RateController(AdaptSettings(start_rate=40.0), 0.0)
        assert 20.0 == c.throttled(1.0)
        assert 40.0 == c.limit

    def test_one_cut_per_interval(self) -> None:
        """429s of requests already in flight cut once, not once each; 429s that go on
        after the interval cut harder (0.7: the last cut was not enough); a 429 long after
        the last cut cuts by 0.9."""
        c = RateController(AdaptSettings(start_rate=40.0), 0.0)
        c.throttled(1.0)
        for t in (1.1, 1.5, 1.9):
            assert 20.0 == c.throttled(t)
        assert pytest.approx(14.0) == c.throttled(2.1)
        assert pytest.approx(12.6) == c.throttled(10.0)

    def test_back_to_just_under_the_limit(self) -> None:
        """After a cut the rate closes in on 0.97 of the remembered limit within seconds,
        and holds there."""
        c = RateController(AdaptSettings(start_rate=40.0), 0.0)
        c.throttled(0.0)
        t = 0.0
        while t < 10.0:
            t += 0.05
            c.answered(t, binding=True)
        assert pytest.approx(0.97 * 40.0) == c.rate

    def test_probe_after_holding(self) -> None:
        """Holding for probe_every_s with no 429 raises the limit by probe_step."""
        s = AdaptSettings(start_rate=40.0, probe_every_s=5.0, probe_step=0.02)
        c = RateController(s, 0.0)
        c.throttled(0.0)
        t = 0.0
        while t < 30.0:
            t += 0.05
            c.answered(t, binding=True)
        assert c.probes >= 1
        assert c.limit is not None and c.limit > 40.0

    def test_policy_header_sets_the_rate(self) -> None:
        """A RateLimit-Policy is the limit: the rate is set to it, never above --max-rate,
        and nothing is probed."""
        c = RateController(AdaptSettings(max_rate=30.0), 0.0)
        assert 25.0 == c.answered(0.1, binding=True, hints=RateHints(policy_rate=25.0))
        assert 30.0 == c.answered(0.2, binding=True, hints=RateHints(policy_rate=90.0))
        for i in range(1, 1000):
            c.answered(0.2 + i * 0.1, binding=True)
        assert 30.0 == c.rate and 0 == c.probes

    @settings(max_examples=200, deadline=None)
    @given(
        st.floats(1.0, 500.0),
        st.lists(st.tuples(st.floats(0.0, 3.0), st.booleans(), st.booleans()), max_size=300),
    )
    def test_rate_stays_within_bounds(
        self, max_rate: float, answers: list[tuple[float, bool, bool]]
    ) -> None:
        """Whatever the answers: min_rate <= rate <= --max-rate."""
        s = AdaptSettings(max_rate=max_rate)
        c = RateController(s, 0.0)
        t = 0.0
        for gap, refused, binding in answers:
            t += gap
            rate = c.throttled(t) if refused else c.answered(t, binding=binding)
            assert min(s.min_rate, max_rate) <= rate <= max_rate


# -- against model APIs, in simulated time -----------------------------------------------------


class _Bucket:
    """The issue's gateway: a token bucket of R, refilled at R/s."""

    def __init__(self, rate: float) -> None:
        self.rate, self.tokens, self.at = rate, rate, 0.0

    def take(self, now: float) -> float:
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class _Sliding:
    """At most R in any one second."""

    def __init__(self, rate: float) -> None:
        self.limit, self.times = int(rate), deque[float]()

    def take(self, now: float) -> float:
        while self.times and now - self.times[0] >= 1.0:
            self.times.popleft()
        if len(self.times) < self.limit:
            self.times.append(now)
            return 0.0
        return 1.0 - (now - self.times[0])


def _drive(api: _Bucket | _Sliding, limit: float, seconds: float) -> tuple[float, float]:
    """A worker with endless work under --rate auto against ``api``: from the 30th second
    on, the API's rate used and the share of requests answered 429 (honouring Retry-After,
    a whole number of seconds, as the simulator sends it)."""
    latency = 0.02
    now = 0.0
    controller = RateController(AdaptSettings(), now)
    schedule = Schedule(controller.rate)
    ok = refused = 0
    while now < seconds:
        while not schedule.take(now):
            now += schedule.wait_s(now)
        wait = api.take(now + latency)
        answered = now + latency
        if wait > 0.0:
            schedule.pause_until(answered + max(1, math.ceil(wait)))
            rate = controller.throttled(answered)
            refused += now >= 30.0
        else:
            rate = controller.answered(answered, binding=True)
            ok += now >= 30.0
        if rate != schedule.rate_per_s:
            schedule.set_rate(rate, now)
    return ok / (seconds - 30.0) / limit, refused / max(1, ok + refused)


class TestConvergence:
    """The issue's goals, in a model: after 30 s, >= 0.95 of the API's rate, <= 2 % 429."""

    @pytest.mark.parametrize("limit", [5.0, 20.0, 100.0])
    @pytest.mark.parametrize("api", [_Bucket, _Sliding])
    def test_learns_a_hidden_limit(self, api: type[_Bucket | _Sliding], limit: float) -> None:
        """Against a token bucket of R and against a one-second sliding window."""
        used, refused = _drive(api(limit), limit, 240.0)
        assert used >= 0.95
        assert refused <= 0.02


class TestAdopt:
    """Replicas sharing the account's schedule follow the rate another one published."""

    def test_a_lower_rate_counts_as_a_429(self) -> None:
        """Another replica cut the account's rate: ours follows, slow start ends, and the
        rate we were at is remembered as the limit."""
        c = RateController(AdaptSettings(start_rate=40.0), 0.0)
        assert 20.0 == c.adopt(20.0)
        assert 40.0 == c.limit

    def test_a_higher_rate_in_slow_start_is_not_taken(self) -> None:
        """In slow start each replica doubles its own: taking another's would compound."""
        c = RateController(AdaptSettings(start_rate=4.0), 0.0)
        assert 4.0 == c.adopt(16.0)

    def test_a_higher_rate_is_taken_once_a_limit_is_known(self) -> None:
        """Past slow start, another replica's growth (its probe, its approach) is taken."""
        c = RateController(AdaptSettings(start_rate=40.0), 0.0)
        c.throttled(0.0)
        assert 30.0 == c.adopt(30.0)
        assert 200.0 == c.adopt(1e9)  # never above --max-rate
