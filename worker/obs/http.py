"""The status port: /healthz, /readyz and /metrics (Prometheus text format)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from worker.engine import Engine


class EngineCollector(Collector):
    """Reads the engine's counters at scrape time: nothing is counted twice on the hot path."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        """The current values."""
        e, s = self.engine.stats, self.engine.scheduler.stats
        coalescer = self.engine.scheduler.coalescer
        yield CounterMetricFamily(
            "contact_worker_changes_read", "Records read from the source", value=e.records
        )
        yield CounterMetricFamily(
            "contact_worker_changes_invalid", "Records dead-lettered invalid", value=e.invalid
        )
        yield CounterMetricFamily(
            "contact_worker_changes_coalesced",
            "Changes merged into a waiting change of the same ID",
            value=coalescer.coalesced,
        )
        yield CounterMetricFamily(
            "contact_worker_contacts_applied",
            "Contacts applied by the API",
            value=s.contacts_applied,
        )
        requests = CounterMetricFamily(
            "contact_worker_requests", "PATCH requests by outcome", labels=["status"]
        )
        for status, count in sorted(s.requests.items()):
            requests.add_metric([status], count)
        yield requests
        yield CounterMetricFamily(
            "contact_worker_isolation_requests",
            "Requests spent on finding unknown or rejected IDs",
            value=s.isolation_requests,
        )
        dead = CounterMetricFamily(
            "contact_worker_dead_letters", "Dead letters by reason", labels=["reason"]
        )
        for reason, count in sorted((dict(s.dead_letters) | {"invalid": e.invalid}).items()):
            dead.add_metric([reason], count)
        yield dead
        yield CounterMetricFamily("contact_worker_retries", "Requests retried", value=s.retries)
        yield GaugeMetricFamily(
            "contact_worker_in_flight_requests", "Requests in flight", value=e.in_flight
        )
        yield GaugeMetricFamily(
            "contact_worker_waiting_changes",
            "Changes waiting to be sent",
            value=coalescer.changes_waiting,
        )
        yield CounterMetricFamily(
            "contact_worker_rate_limit_wait_seconds",
            "Time senders waited on the rate limiter",
            value=e.rate_wait_s,
        )


@asynccontextmanager
async def serve_status(
    engine: Engine,
    port: int,
    host: str = "0.0.0.0",
    *,
    configure: Callable[[web.Application], None] | None = None,
) -> AsyncIterator[int]:
    """Serve the status endpoints (and what ``configure`` adds) while the block runs.

    Yields the bound port.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine))

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ready, why = engine.readiness()
        return web.json_response({"ready": ready, "reason": why}, status=200 if ready else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), content_type="text/plain", charset="utf-8"
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if configure is not None:
        configure(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    try:
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        yield sockets[0].getsockname()[1] if sockets else port
    finally:
        await runner.cleanup()
