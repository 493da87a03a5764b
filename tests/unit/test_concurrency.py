"""The adaptive concurrency limit (``--concurrency auto``): grows while latency-bound, shrinks
when the latency rises or requests fail, and never grows past what the rate limit needs."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_config import REQUIRED, parse
from worker.config import AUTO, senders
from worker.config_file import resolve
from worker.core.concurrency import AdaptiveLimit, AdaptiveSettings, Sample
from worker.errors import ConfigError


def run_api(limit: AdaptiveLimit, latency_s: float, rounds: int, rate: float | None = None) -> int:
    """Answer ``rounds`` round trips of a fixed-latency API that queues nothing: every
    request of a round goes out with the limit used in full, unless the rate holds them."""
    now = 0.0
    for _ in range(rounds):
        in_flight = limit.limit
        held = rate is not None and in_flight > rate * latency_s
        now += latency_s
        for _ in range(in_flight):
            limit.answered(Sample(latency_s, in_flight, in_flight, rate_waited=held), now, rate)
    return limit.limit


class TestGrowth:
    def test_slow_start_reaches_the_ceiling_in_a_few_round_trips(self) -> None:
        """Latency-bound with the API keeping up: the limit doubles per round trip up to
        --max-concurrency (from 8 to 64: three round trips)."""
        limit = AdaptiveLimit(AdaptiveSettings(max_limit=64))
        assert 8 == limit.limit
        assert 64 == run_api(limit, 0.2, rounds=3)

    def test_never_past_the_ceiling(self) -> None:
        """However long it runs, the ceiling holds."""
        assert 16 == run_api(AdaptiveLimit(AdaptiveSettings(max_limit=16)), 0.05, rounds=100)

    def test_no_growth_when_the_limit_is_not_used(self) -> None:
        """Answers to requests that went out with fewer in flight than the limit (nothing
        more to send: the input binds) do not grow it."""
        limit = AdaptiveLimit()
        for i in range(100):
            limit.answered(Sample(0.05, 2, 8), i * 0.05)
        assert 8 == limit.limit

    def test_half_used_with_work_waiting_grows(self) -> None:
        """Answers come in bursts and the requests they free go out one by one: a request
        that went out with half the limit used while a full batch more was waiting counts as
        held back by the limit; with nothing waiting it does not."""
        limit = AdaptiveLimit(AdaptiveSettings(max_limit=64))
        limit.answered(Sample(0.05, 4, 8, queued=True), 0.05)
        assert 9 == limit.limit
        limit.answered(Sample(0.05, 4, 8), 0.1)
        limit.answered(Sample(0.05, 3, 8, queued=True), 0.15)
        assert 9 == limit.limit

    def test_no_growth_while_the_rate_limiter_binds(self) -> None:
        """Requests that waited for the rate limiter, or were answered 429, never grow it."""
        limit = AdaptiveLimit()
        for i in range(100):
            limit.answered(Sample(0.05, 8, 8, rate_waited=True), i * 0.05)
        assert 8 == limit.limit


class TestRateLimit:
    @pytest.mark.parametrize(("rate", "latency_s"), [(20.0, 0.05), (20.0, 0.2), (100.0, 0.2)])
    def test_stays_within_what_the_rate_needs(self, rate: float, latency_s: float) -> None:
        """At a rate limit, the limit stays within Little's law for the rate: rate x latency
        x 1.5 (headroom), plus one."""
        needed = math.ceil(rate * latency_s * 1.5 + 1.0)
        limit = AdaptiveLimit(AdaptiveSettings(max_limit=64))
        assert needed >= run_api(limit, latency_s, rounds=50, rate=rate)
        assert needed >= limit.highest  # from the first answer on, never more

    def test_the_rate_needs_more_than_the_start(self) -> None:
        """A rate that needs more in flight than the start lets it grow that far."""
        limit = AdaptiveLimit(AdaptiveSettings(max_limit=64))
        final = run_api(limit, 0.2, rounds=20, rate=100.0)
        assert 20 <= final <= math.ceil(100 * 0.2 * 1.5 + 1)


class TestDecrease:
    def test_latency_rise_cuts_by_the_ratio(self) -> None:
        """When the recent round trip passes twice the baseline, the limit is cut by that
        ratio, once per round trip, until the queueing is gone."""
        limit = AdaptiveLimit(AdaptiveSettings(max_limit=64, initial=40))
        now = 0.0
        for _ in range(50):
            now += 0.05
            limit.answered(Sample(0.05, 1, 64), now)
        assert 40 == limit.limit
        for _ in range(30):  # the API slows down eightfold, all at once
            limit.answered(Sample(0.4, 1, 64), now)
        assert 1 == limit.decreases  # one cut within the round trip
        assert 20 <= limit.limit < 40  # never below half at a time
        for _ in range(5):
            now += 0.4
            for _ in range(10):
                limit.answered(Sample(0.4, 1, 64), now)
        assert limit.limit <= 20
        assert 2 <= limit.decreases <= 6  # at most one per round trip

    def test_failure_cuts_to_three_quarters_once_per_round_trip(self) -> None:
        """A timeout or 5xx cuts the limit to 3/4; a burst of them within one round trip
        counts once."""
        limit = AdaptiveLimit(AdaptiveSettings(max_limit=64, initial=40))
        limit.answered(Sample(0.1, 1, 64), 0.0)
        for _ in range(10):
            limit.answered(Sample(0.1, 1, 64, failed=True), 1.0)
        assert 30 == limit.limit
        limit.answered(Sample(0.1, 1, 64, failed=True), 2.0)
        assert 22 == limit.limit

    def test_grows_slowly_after_a_cut(self) -> None:
        """After a cut, growth is one per round trip (additive), not doubling."""
        limit = AdaptiveLimit(AdaptiveSettings(max_limit=64, initial=20))
        limit.answered(Sample(0.1, 1, 64), 0.0)
        limit.answered(Sample(0.1, 1, 64, failed=True), 0.1)
        assert 15 == limit.limit
        assert 16 <= run_api(limit, 0.1, rounds=2) <= 17  # doubling would give 60

    def test_floor(self) -> None:
        """Failures never take it below the minimum."""
        limit = AdaptiveLimit(AdaptiveSettings(min_limit=2, initial=3))
        for i in range(100):
            limit.answered(Sample(1.0, 1, 64, failed=True), float(i * 10))
        assert 2 == limit.limit

    def test_bad_bounds_refused(self) -> None:
        """min_limit above max_limit is a programming error, said at once."""
        with pytest.raises(ValueError, match="min_limit"):
            AdaptiveLimit(AdaptiveSettings(min_limit=5, max_limit=4))


SAMPLES = st.lists(
    st.tuples(
        st.floats(0.0, 5.0),  # rtt
        st.integers(0, 200),  # in flight
        st.booleans(),  # rate waited
        st.booleans(),  # failed
        st.floats(0.0, 2.0),  # time step
    ),
    max_size=300,
)


class TestProperties:
    @settings(max_examples=300, deadline=None)
    @given(SAMPLES, st.integers(1, 8), st.integers(8, 128), st.none() | st.floats(0.1, 500.0))
    def test_always_within_bounds(
        self,
        samples: list[tuple[float, int, bool, bool, float]],
        low: int,
        high: int,
        rate: float | None,
    ) -> None:
        """Whatever the answers, min_limit <= limit <= max_limit, and it moves up by at most
        one per answer."""
        limit = AdaptiveLimit(AdaptiveSettings(min_limit=low, max_limit=high))
        now = 0.0
        for rtt, in_flight, waited, failed, step in samples:
            before = limit.limit
            now += step
            after = limit.answered(Sample(rtt, in_flight, before, waited, failed), now, rate)
            assert low <= after <= high
            assert after <= before + 1

    @settings(max_examples=300, deadline=None)
    @given(SAMPLES)
    def test_never_grows_on_rate_waits_or_failures(
        self, samples: list[tuple[float, int, bool, bool, float]]
    ) -> None:
        """An answer that waited for the rate, or failed, never raises the limit."""
        limit = AdaptiveLimit()
        now = 0.0
        for rtt, in_flight, waited, failed, step in samples:
            before = limit.limit
            now += step
            after = limit.answered(Sample(rtt, in_flight, before, waited or failed, failed), now)
            if waited or failed:
                assert after <= before

    @settings(max_examples=200, deadline=None)
    @given(st.floats(0.001, 2.0), st.integers(2, 128))
    def test_reaches_the_ceiling_when_latency_bound(self, latency_s: float, high: int) -> None:
        """A steady API and a limit always used: --max-concurrency within
        log2(max) + 1 round trips."""
        limit = AdaptiveLimit(AdaptiveSettings(max_limit=high))
        assert high == run_api(limit, latency_s, rounds=math.ceil(math.log2(high)) + 1)


class TestOption:
    def test_auto(self) -> None:
        """--concurrency auto runs --max-concurrency senders under the adaptive limit."""
        settings = resolve(parse([*REQUIRED, "--concurrency", "auto"]), {})
        assert (AUTO, 64, 64) == (
            settings.concurrency,
            settings.max_concurrency,
            senders(settings),
        )
        settings = resolve(
            parse(REQUIRED), {"WORKER_CONCURRENCY": "AUTO", "WORKER_MAX_CONCURRENCY": "16"}
        )
        assert (AUTO, 16) == (settings.concurrency, senders(settings))

    def test_fixed_number_unchanged(self) -> None:
        """--concurrency N keeps N senders, whatever --max-concurrency says."""
        settings = resolve(parse([*REQUIRED, "--concurrency", "5", "--max-concurrency", "9"]), {})
        assert 5 == senders(settings)

    @pytest.mark.parametrize(
        ("argv", "fragment"),
        [
            (["--concurrency", "fast"], "--concurrency: not a number: 'fast' (or auto)"),
            (["--concurrency", "0"], "--concurrency: must be at least 1, got 0 (or auto)"),
            (["--max-concurrency", "0"], "--max-concurrency: must be at least 1"),
        ],
    )
    def test_bad_values_named(self, argv: list[str], fragment: str) -> None:
        """A bad value names the flag and says what is allowed."""
        with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            resolve(parse([*REQUIRED, *argv]), {})
