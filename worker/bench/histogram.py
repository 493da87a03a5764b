"""A log-bucketed latency histogram: constant memory, O(1) per sample, ~1% quantile error.

Used by the worker's probe (one sample per acknowledged change, possibly millions) and by the
baselines; merged and read by the harness. Pure: no clock, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

BASE_S = 1e-4
"""Samples at or below 0.1 ms share the first bucket."""
GROWTH = 1.02
"""Each bucket is 2% wider than the one before: quantiles are good to about 1%."""
_LOG_GROWTH = math.log(GROWTH)


def bucket_of(seconds: float) -> int:
    """The bucket index of a sample."""
    if seconds <= BASE_S:
        return 0
    return 1 + int(math.log(seconds / BASE_S) / _LOG_GROWTH)


def bucket_value(index: int) -> float:
    """A representative value of a bucket: the geometric middle of its bounds."""
    if index <= 0:
        return BASE_S
    return float(BASE_S * GROWTH ** (index - 0.5))


@dataclass
class Histogram:
    """Counts per bucket, with the exact count, sum and maximum."""

    counts: dict[int, int] = field(default_factory=dict)
    count: int = 0
    total_s: float = 0.0
    max_s: float = 0.0

    def add(self, seconds: float) -> None:
        """Record one sample (negative samples count as 0)."""
        seconds = max(0.0, seconds)
        index = bucket_of(seconds)
        self.counts[index] = self.counts.get(index, 0) + 1
        self.count += 1
        self.total_s += seconds
        if seconds > self.max_s:
            self.max_s = seconds

    def add_many(self, seconds: float, times: int) -> None:
        """Record ``times`` samples of the same value."""
        if times <= 0:
            return
        seconds = max(0.0, seconds)
        index = bucket_of(seconds)
        self.counts[index] = self.counts.get(index, 0) + times
        self.count += times
        self.total_s += seconds * times
        self.max_s = max(self.max_s, seconds)

    def merge(self, other: Histogram) -> None:
        """Add another histogram's samples to this one."""
        for index, n in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + n
        self.count += other.count
        self.total_s += other.total_s
        self.max_s = max(self.max_s, other.max_s)

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0..1) in seconds; None when empty. The maximum is exact."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be between 0 and 1, got {q}")
        if self.count == 0:
            return None
        if q == 1.0:
            return self.max_s
        rank = q * self.count
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen > rank:
                return min(bucket_value(index), self.max_s)
        return self.max_s

    @property
    def mean_s(self) -> float | None:
        """The mean in seconds; None when empty."""
        return self.total_s / self.count if self.count else None

    def summary(self) -> dict[str, float | int | None]:
        """count, mean, p50, p95, p99 and max, in seconds."""
        return {
            "count": self.count,
            "mean_s": self.mean_s,
            "p50_s": self.quantile(0.5),
            "p95_s": self.quantile(0.95),
            "p99_s": self.quantile(0.99),
            "max_s": self.max_s if self.count else None,
        }

    def points(self) -> list[tuple[float, int]]:
        """(bucket value in seconds, count) in increasing order: for charts."""
        return [(bucket_value(i), self.counts[i]) for i in sorted(self.counts)]

    def to_json(self) -> dict[str, Any]:
        """Plain data (bucket indexes as strings, for JSON)."""
        return {
            "base_s": BASE_S,
            "growth": GROWTH,
            "counts": {str(i): n for i, n in sorted(self.counts.items())},
            "count": self.count,
            "total_s": self.total_s,
            "max_s": self.max_s,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Histogram:
        """The inverse of :meth:`to_json`; ValueError if the buckets differ from ours."""
        if data.get("base_s") != BASE_S or data.get("growth") != GROWTH:
            raise ValueError("histogram with other buckets")
        counts = {int(i): int(n) for i, n in data.get("counts", {}).items()}
        return cls(counts, int(data["count"]), float(data["total_s"]), float(data["max_s"]))

    @classmethod
    def of(cls, samples: Iterable[float]) -> Histogram:
        """A histogram of these samples."""
        histogram = cls()
        for sample in samples:
            histogram.add(sample)
        return histogram
