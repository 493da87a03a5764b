"""The status port: /healthz, /readyz and /metrics (Prometheus text format).

The port faces whatever can reach it, so it bounds what a client can hold (docs/operations.md,
"Probes and metrics", "The status port's limits"):

- **headers**: a connection must complete each request head within ``header_timeout_s`` of
  opening (or of its previous answer), else it is closed. aiohttp has no timeout of its own for
  this; its keep-alive timer does the job: it starts when the connection opens and after each
  answer, is not pushed back by incoming bytes, and closes a connection whose handler still
  waits for a complete request head. So a slowloris client that drips header bytes is cut at
  the deadline however it drips, and an idle keep-alive connection lives as long.
- **bodies**: only ``POST /v1/changes`` reads one, within its own deadline
  (:mod:`worker.backends.sqlite.ingest`); a body the other routes leave unread is drained for
  at most aiohttp's lingering time (10 s).
- **connections**: at most ``max_connections`` at once. A new connection beyond the cap closes
  the oldest one that has no request in a handler (one still sending its head, or idle between
  requests), so probes get through while the cap is full of stalled sockets; if every one is
  busy, the new connection is closed at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from aiohttp import web
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from worker.obs.metrics import status_registry
from worker.obs.readiness import readiness

if TYPE_CHECKING:
    from worker.engine import Engine

HEADER_TIMEOUT_S = 10.0
"""Default time a connection has to send a complete request head (and an idle keep-alive
connection stays open)."""
MAX_CONNECTIONS = 100
"""Default cap on the status port's open connections."""


@dataclass(frozen=True, slots=True)
class PortLimits:
    """What one client may hold on the status port."""

    header_timeout_s: float = HEADER_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS


class PortStatistics(NamedTuple):
    """The status port's connections, for metrics."""

    connections: int
    """Connections open now."""
    shed: int
    """Connections closed to stay within the cap (evicted idle ones and refused new ones)."""


class _Refused(asyncio.Protocol):
    """A connection over the cap with nobody idle to make room: closed as soon as it opens."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _Admission:
    """The protocol factory of the listening socket: aiohttp's, within the connection cap."""

    def __init__(self, max_connections: int) -> None:
        self.server: web.Server | None = None
        """aiohttp's protocol factory, set once the app runner is set up."""
        self.max_connections = max_connections
        self.busy: dict[web.RequestHandler, int] = {}
        """Connections with a request in a handler now (and how many: pipelining)."""
        self.shed = 0

    def open_connections(self) -> list[web.RequestHandler]:
        """Connections open and not closing, oldest first."""
        out: list[web.RequestHandler] = []
        if self.server is None:
            return out
        for handler in self.server.connections:  # in the order they were made
            transport = handler.transport
            if transport is not None and not transport.is_closing():
                out.append(handler)
        return out

    def __call__(self) -> asyncio.BaseProtocol:
        connections = self.open_connections()
        if len(connections) >= self.max_connections:
            victim = next((h for h in connections if h not in self.busy), None)
            self.shed += 1
            if victim is None:
                return _Refused()
            transport = victim.transport
            if transport is not None:
                # abort, not close: a client that does not read would keep a closing socket
                # open as long as its unsent answer waits in the buffer.
                transport.abort()
        assert self.server is not None  # set before the socket listens
        return self.server()

    @web.middleware
    async def track(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Mark the connection busy while a handler runs: the cap never evicts it then."""
        protocol = request.protocol
        self.busy[protocol] = self.busy.get(protocol, 0) + 1
        try:
            return await handler(request)
        finally:
            left = self.busy[protocol] - 1
            if left:
                self.busy[protocol] = left
            else:
                del self.busy[protocol]

    def statistics(self) -> PortStatistics:
        """Connections open now, and shed so far."""
        return PortStatistics(len(self.open_connections()), self.shed)


@asynccontextmanager
async def serve_status(
    engine: Engine,
    port: int,
    host: str = "0.0.0.0",
    *,
    configure: Callable[[web.Application], None] | None = None,
    limits: PortLimits | None = None,
) -> AsyncIterator[int]:
    """Serve the status endpoints (and what ``configure`` adds) while the block runs.

    Yields the bound port.
    """
    limits = limits or PortLimits()
    admission = _Admission(limits.max_connections)
    registry = status_registry(engine, admission.statistics)

    async def healthz(_: web.Request) -> web.Response:
        # Answering at all is the proof: this runs on the engine's event loop, so a loop that
        # is stalled (a blocking call, a busy loop) lets the probe time out.
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ready, why, detail = readiness(engine)
        body: dict[str, object] = {"ready": ready, "reason": why}
        if detail:
            body["detail"] = detail
        return web.json_response(body, status=200 if ready else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4}
        )

    app = web.Application(middlewares=[admission.track])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if configure is not None:
        configure(app)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=limits.header_timeout_s)
    await runner.setup()
    try:
        admission.server = runner.server
        # Our own listening socket rather than a TCPSite: only the protocol factory can see a
        # connection before aiohttp takes it, which the cap needs.
        listener = await asyncio.get_running_loop().create_server(
            admission, host, port, reuse_address=True
        )
    except BaseException:
        await runner.cleanup()
        raise
    try:
        yield listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        await runner.cleanup()
