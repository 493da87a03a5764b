"""The histograms the engine fills as it works: plain bucket counts, no Prometheus.

:class:`Buckets` keeps a histogram as a plain list of counts (one ``bisect`` and one addition
per observation); ``worker.obs.metrics`` turns them into Prometheus histograms at scrape time.
Kept apart from it so that a run without a status port never imports prometheus_client.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.core.coalesce import Entry

REQUEST_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Bucket bounds of a request's duration: up to the default request timeout and beyond."""
BATCH_CONTACTS = (1, 2, 5, 10, 25, 50, 100, 200, 500, 1000)
"""Bucket bounds of the contacts in one request."""
ACK_SECONDS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)
"""Bucket bounds of change-to-ack latency: from a quiet stream to a backlog of an hour."""


class Buckets:
    """A histogram as Prometheus counts it (``le`` upper bounds), without locks or labels.

    Only the event loop's thread touches it, scrapes included, so a plain list is enough.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        """Observations per bucket (not cumulative); the last one is ``+Inf``."""
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """Count ``value`` (``times`` over)."""
        self.counts[bisect_left(self.bounds, value)] += times
        self.sum += value * times

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, observations <= le)`` pairs, ending with ``+Inf``: Prometheus' form."""
        pairs, total = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            pairs.append((_le(bound), float(total)))
        return pairs


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


@dataclass(slots=True)
class EngineHistograms:
    """What the engine observes as it works: per request, per batch, per acknowledged change."""

    request_seconds: Buckets = field(default_factory=lambda: Buckets(REQUEST_SECONDS))
    batch_contacts: Buckets = field(default_factory=lambda: Buckets(BATCH_CONTACTS))
    ack_seconds: Buckets = field(default_factory=lambda: Buckets(ACK_SECONDS))

    def acked(self, entries: list[Entry], changes: int, now: float) -> None:
        """These entries (``changes`` changes in all) were acknowledged at ``now``.

        Each change counts once, measured from its entry's oldest change's arrival. This runs
        per request, so it avoids a Python-level loop per entry where it can: the entries
        created from one read share one arrival time (the same float object), and a request's
        entries nearly always come from one read: one comprehension and one ``list.count``
        (identity comparisons) then settle all of them.
        """
        if not entries:
            return
        latency = self.ack_seconds
        bounds, counts = latency.bounds, latency.counts
        sinces = [entry.since for entry in entries]
        first = sinces[0]
        if sinces.count(first) == len(sinces):
            waited = now - first
            counts[bisect_left(bounds, waited)] += changes
            latency.sum += waited * changes
            return
        total = 0.0
        for entry in entries:
            weight = entry.changes
            waited = now - entry.since
            counts[bisect_left(bounds, waited)] += weight
            total += waited * weight
        latency.sum += total
