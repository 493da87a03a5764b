"""The status port: /healthz, /readyz and /metrics (Prometheus text format)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest

from worker.obs.metrics import EngineCollector

if TYPE_CHECKING:
    from worker.engine import Engine


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
        # Answering at all is the proof: this runs on the engine's event loop, so a loop that
        # is stalled (a blocking call, a busy loop) lets the probe time out.
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ready, why = engine.readiness()
        return web.json_response({"ready": ready, "reason": why}, status=200 if ready else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4}
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
