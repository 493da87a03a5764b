"""The worker's Prometheus metrics: cheap histograms the engine fills, read at scrape time.

Counters and gauges are not kept here at all: the collector reads the engine's and the
scheduler's own counters when Prometheus scrapes, so nothing is counted twice on the hot path.
Histograms need observations as the work happens; :class:`Buckets` keeps them as a plain list
of counts (one ``bisect`` and one addition per observation), and the collector turns them into
Prometheus histograms at scrape time. Every name and meaning is listed in docs/operations.md
("Probes and metrics").
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from worker import __version__
from worker.obs.histograms import Buckets
from worker.obs.readiness import readiness

if TYPE_CHECKING:
    from worker.backends.base import SourceStatistics
    from worker.engine import Engine
    from worker.obs.http import PortStatistics

PREFIX = "contact_worker_"


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    # CounterMetricFamily appends _total to the sample name: the family is named without it.
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def _labelled(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(PREFIX + name, doc, labels=[label])
    for key, count in sorted(values.items()):
        family.add_metric([key], count)
    return family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


def _histogram(name: str, doc: str, buckets: Buckets) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        PREFIX + name, doc, buckets=buckets.cumulative(), sum_value=buckets.sum
    )


class EngineCollector(Collector):
    """Reads the engine's counters and histograms at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        """The current values."""
        engine = self.engine
        e, s, h = engine.stats, engine.scheduler.stats, engine.histograms
        coalescer = engine.scheduler.coalescer
        yield _counter("changes_read", "Records read from the source", e.records)
        yield _counter("changes_invalid", "Records dead-lettered as invalid, never sent", e.invalid)
        yield _counter(
            "changes_coalesced",
            "Changes merged into a waiting change of the same ID (requests saved)",
            coalescer.coalesced,
        )
        yield _counter("changes_applied", "Changes applied by the API", s.changes_applied)
        yield _counter(
            "changes_acked",
            "Records acknowledged to the source (applied or dead-lettered)",
            e.acked,
        )
        yield _counter(
            "contacts_applied",
            "Contacts applied by the API (merged changes count once)",
            s.contacts_applied,
        )
        yield _labelled(
            "requests",
            "PATCH requests by HTTP status (error: no answer)",
            "status",
            dict(s.requests),
        )
        yield _counter(
            "isolation_requests",
            "Requests spent on finding unknown or rejected IDs",
            s.isolation_requests,
        )
        yield _labelled(
            "dead_letters",
            "Changes dead-lettered, by reason",
            "reason",
            dict(s.dead_letters) | {"invalid": e.invalid},
        )
        yield _counter("retries", "Requests that failed transiently and will be retried", s.retries)
        yield from _knowledge(engine)
        yield _counter(
            "rate_limit_wait_seconds",
            "Time senders waited on the rate limiter, summed over senders",
            e.rate_wait_s,
        )
        yield _gauge("in_flight_requests", "Requests sent and not answered yet", e.in_flight)
        yield _gauge(
            "waiting_changes",
            "Changes read and not sent yet (the backlog in memory)",
            coalescer.changes_waiting,
        )
        limiter = engine.limiter
        yield _gauge(
            "rate_limit_requests_per_second",
            "Most requests per second the worker sends now (--rate, or what --rate auto"
            " learned; 0 = no limit)",
            0.0 if limiter is None else limiter.rate_per_s,
        )
        yield _counter(
            "api_pauses",
            "Pauses of every sender the API asked for (Retry-After, capped by --max-retry-after)",
            e.pauses,
        )
        yield _counter(
            "api_paused_seconds",
            "Seconds every sender was paused by the API's Retry-After",
            e.paused_s,
        )
        yield _gauge(
            "api_paused_remaining_seconds",
            "Seconds the pause of every sender still lasts (0: not paused)",
            engine.paused_s,
        )
        yield _gauge(
            "concurrency_limit",
            "Most requests in flight at once now (--concurrency, or the adaptive limit of"
            " --concurrency auto)",
            engine.concurrency_limit,
        )
        yield _gauge(
            "batch_size_limit",
            "Most contacts per request now (--batch-size, lowered after a 413)",
            engine.scheduler.ceiling,
        )
        ready = readiness(engine).ready
        yield _gauge("ready", "1 while /readyz answers 200, else 0", 1.0 if ready else 0.0)
        yield from _input(engine.source.statistics())
        yield _histogram(
            "request_duration_seconds", "Time from sending a PATCH to its answer", h.request_seconds
        )
        yield _histogram("batch_size_contacts", "Contacts per PATCH request", h.batch_contacts)
        yield _histogram(
            "change_ack_latency_seconds",
            "Time from reading a change to acknowledging it (applied or dead-lettered);"
            " merged changes count from the oldest one's arrival",
            h.ack_seconds,
        )


def _knowledge(engine: Engine) -> Iterator[Metric]:
    """What ID knowledge answered, and what went to and from its store."""
    knowledge = engine.scheduler.knowledge
    lookups = dict(knowledge.stats.hits) | {"unknown": knowledge.stats.misses}
    yield _labelled(
        "id_knowledge_lookups",
        "IDs looked up when a batch was composed: hits (exists, missing) and misses (unknown)",
        "result",
        lookups,
    )
    yield _gauge("id_knowledge_ids", "IDs known in memory (exists or missing)", len(knowledge))
    stats = engine.scheduler.stats
    yield _counter(
        "id_contradictions",
        "Lone 404s on contacts the API had applied lately",
        stats.contradictions,
    )
    yield _counter(
        "isolation_riders",
        "Contacts that rode in the requests of a search for unknown IDs (filling them)",
        stats.riders,
    )
    yield _counter(
        "inferred_culprits",
        "Unknown IDs found without a request of their own: every other ID of a refused set"
        " was applied",
        stats.inferred_culprits,
    )
    yield _gauge(
        "unknown_share",
        "Share of fresh IDs found missing, as estimated (it sizes their groups)",
        engine.scheduler.unknown_share.share,
    )
    feed = engine.knowledge
    if feed is not None:
        f = feed.stats
        yield _counter("id_knowledge_loaded", "Facts loaded from the store", f.loaded)
        yield _counter("id_knowledge_saved", "Facts written to the store", f.saved)
        yield _counter(
            "id_knowledge_store_failures", "Store operations that failed (run went on)", f.failures
        )


def _input(stats: SourceStatistics) -> Iterator[Metric]:
    """The input's own state; the partition, lease and spool families only where they apply."""
    yield _gauge(
        "input_available",
        "1 while the input can be read, 0 while it is unreachable (reconnecting)",
        1.0 if stats.available else 0.0,
    )
    yield _counter(
        "input_reconnects", "Outages of the input it set out to reconnect after", stats.reconnects
    )
    yield _gauge(
        "input_unacked_records",
        "Records handed to the engine and not acknowledged to the input yet",
        stats.unacked,
    )
    if stats.partitions_held is not None:
        yield _gauge(
            "input_partitions_held", "Partitions this replica reads now", stats.partitions_held
        )
    if stats.leases_lost:
        yield _labelled(
            "input_leases_lost",
            "Leases lost to expiry or another replica, by kind (partition, row)",
            "kind",
            dict(stats.leases_lost),
        )
    if stats.spool_depth is not None:
        yield _gauge(
            "input_spool_depth",
            "Changes stored in the input and not acknowledged yet (read or not)",
            stats.spool_depth,
        )


class BuildInfo(Collector):
    """``contact_worker_build_info{version, python}``: always 1, the labels are the point."""

    def collect(self) -> Iterator[Metric]:
        """The one series."""
        family = GaugeMetricFamily(
            PREFIX + "build_info",
            "The worker's version and Python's (always 1)",
            labels=["version", "python"],
        )
        family.add_metric([__version__, platform.python_version()], 1.0)
        yield family


class PortCollector(Collector):
    """The status port's connections."""

    def __init__(self, statistics: Callable[[], PortStatistics]) -> None:
        self.statistics = statistics

    def collect(self) -> Iterator[Metric]:
        """The current values."""
        stats = self.statistics()
        yield _gauge("status_connections", "Connections open on the status port", stats.connections)
        yield _counter(
            "status_connections_shed",
            "Status port connections closed to stay within its cap (idle ones evicted, new"
            " ones refused)",
            stats.shed,
        )


def status_registry(
    engine: Engine, port: Callable[[], PortStatistics] | None = None
) -> CollectorRegistry:
    """What /metrics serves: the engine and its input, the port, the build, ``process_*``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine))
    registry.register(BuildInfo())
    if port is not None:
        registry.register(PortCollector(port))
    # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ... (Linux).
    ProcessCollector(registry=registry)
    return registry
