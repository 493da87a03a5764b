"""The latency histogram: quantiles within its bucket width, merging, JSON round trips."""

from __future__ import annotations

import random

import pytest

from worker.bench.histogram import GROWTH, Histogram, bucket_of, bucket_value
from worker.bench.probe import Probe


class TestHistogram:
    def test_quantiles_within_the_bucket_width(self) -> None:
        """p50/p95/p99 of 10,000 samples are within 2% of the exact order statistics."""
        rng = random.Random(3)
        samples = sorted(rng.lognormvariate(-3, 1) for _ in range(10_000))
        histogram = Histogram.of(samples)
        for q in (0.5, 0.95, 0.99):
            exact = samples[int(q * len(samples))]
            assert histogram.quantile(q) == pytest.approx(exact, rel=GROWTH - 1)
        assert histogram.quantile(1.0) == samples[-1]
        assert histogram.mean_s == pytest.approx(sum(samples) / len(samples))

    def test_empty(self) -> None:
        """An empty histogram has no quantiles."""
        assert Histogram().summary()["p50_s"] is None
        assert Histogram().mean_s is None

    def test_tiny_and_negative_samples_share_the_first_bucket(self) -> None:
        """Below 0.1 ms (or a clock step back) everything is one bucket."""
        assert bucket_of(0.0) == bucket_of(-1.0) == bucket_of(1e-6) == 0
        assert bucket_value(0) <= 1e-4

    def test_add_many_equals_adding_one_by_one(self) -> None:
        """add_many(x, n) is n times add(x)."""
        one, many = Histogram(), Histogram()
        for _ in range(5):
            one.add(0.25)
        many.add_many(0.25, 5)
        many.add_many(0.25, 0)
        assert one == many

    def test_merge_and_json(self) -> None:
        """Merging adds counts; to_json/from_json round-trips."""
        a, b = Histogram.of([0.01, 0.02]), Histogram.of([0.5])
        a.merge(b)
        assert a.count == 3 and a.max_s == 0.5
        assert Histogram.from_json(a.to_json()) == a

    def test_other_buckets_are_refused(self) -> None:
        """A histogram from differently sized buckets cannot be read as ours."""
        data = Histogram.of([0.1]).to_json() | {"growth": 1.5}
        with pytest.raises(ValueError):
            Histogram.from_json(data)

    def test_bad_quantile(self) -> None:
        """Quantiles are between 0 and 1."""
        with pytest.raises(ValueError):
            Histogram.of([1.0]).quantile(1.5)


class TestProbe:
    def test_latency_from_the_read_of_each_line(self) -> None:
        """Each acknowledged line counts the time since its chunk was read."""
        now = [10.0]
        probe = Probe(clock=lambda: now[0])
        probe.on_read([(0, b"a"), (1, b"b")])
        now[0] = 11.0
        probe.on_read([(2, b"c")])
        probe.on_read(None)
        now[0] = 11.5
        probe.on_ack([1, 2, 0])
        assert probe.acked == 3 and probe.lines_read == 3
        assert probe.histogram.count == 3
        assert probe.histogram.quantile(0.0) == pytest.approx(0.5, rel=0.02)
        assert probe.histogram.max_s == pytest.approx(1.5)
        assert probe.progress() == {"event": "progress", "read": 3, "acked": 3}
