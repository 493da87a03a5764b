"""The status port under hostile clients: stalled heads, stalled bodies, too many connections.

Raw sockets on 127.0.0.1 play the attackers; a fresh aiohttp client plays the probe.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.abc
import pytest
from aiohttp import web

from tests.engine.test_status import parse
from worker.backends.base import Source
from worker.backends.jsonl.sink import JsonlDeadLetters
from worker.backends.jsonl.source import JsonlSource
from worker.backends.sqlite.ingest import add_ingest_routes
from worker.backends.sqlite.source import SqliteSpoolSource
from worker.config import Secret
from worker.engine import Engine
from worker.obs.http import HEADER_TIMEOUT_S, MAX_CONNECTIONS, PortLimits, serve_status
from worker.sender import Sender

pytestmark = pytest.mark.anyio

TOKEN = "test-ingest-token"
STALLED_HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
"""A request head that never ends (no blank line)."""
CLOSED_WITHIN_S = 60.0
"""How long a test waits for the server to close a stalled socket: generous, never asserted."""


def idle_engine(tmp_path: Path, source: Source | None = None) -> Engine:
    """An engine that is never run: the port answers for it (/readyz says "starting")."""
    return Engine(
        source or JsonlSource(str(tmp_path / "in.jsonl")),
        JsonlDeadLetters(str(tmp_path / "dead.jsonl")),
        Sender("http://127.0.0.1:9", "demo", Secret("demo-secret")),
    )


@asynccontextmanager
async def spool(tmp_path: Path) -> AsyncIterator[SqliteSpoolSource]:
    """An open ``sqlite:`` source for the block."""
    source = SqliteSpoolSource.from_uri(f"sqlite:{tmp_path / 'spool.db'}")
    await source.open()
    try:
        yield source
    finally:
        await source.close()


def with_ingest(source: SqliteSpoolSource, **options: Any) -> Callable[[web.Application], None]:
    """The ``configure`` hook that mounts the spool's ingest, as ``run`` does."""

    def configure(app: web.Application) -> None:
        add_ingest_routes(app, source.spool, token=TOKEN, **options)

    return configure


async def closed_by_server(stream: anyio.abc.SocketStream) -> bytes:
    """Read until the server closes the connection; everything it sent."""
    got = b""
    with anyio.fail_after(CLOSED_WITHIN_S):
        while True:
            try:
                got += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                return got


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    """One GET on a fresh connection: status and body."""
    async with http.get(url, headers={"Connection": "close"}) as resp:
        return resp.status, await resp.text()


async def ingest_head(port: int, length: int) -> bytes:
    """The head of an authorized ``POST /v1/changes`` announcing ``length`` body bytes."""
    return (
        f"POST /v1/changes HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


class TestStalledHeads:
    @pytest.mark.slow
    async def test_healthz_answers_under_slowloris_and_stalled_sockets_are_closed(
        self, tmp_path: Path
    ) -> None:
        """With the default limits, 300 sockets that never finish their request head (some
        dripping a byte now and then) do not keep /healthz from answering, the port never holds
        more than its cap, and the server closes every one of them in the end."""
        assert HEADER_TIMEOUT_S < CLOSED_WITHIN_S
        engine = idle_engine(tmp_path)
        async with (
            serve_status(engine, 0, host="127.0.0.1") as port,
            aiohttp.ClientSession() as http,
            anyio.create_task_group() as tg,
        ):
            attackers = []
            for _ in range(300):
                stream = await anyio.connect_tcp("127.0.0.1", port)
                await stream.send(STALLED_HEAD)
                attackers.append(stream)
            closed: list[bytes] = []

            async def watch(stream: anyio.abc.SocketStream, drip: bool) -> None:
                async with stream:
                    if drip:
                        # Bytes keep coming: a timer pushed back by them would never fire.
                        async def dripping() -> None:
                            with (
                                anyio.move_on_after(CLOSED_WITHIN_S),
                                contextlib.suppress(
                                    anyio.BrokenResourceError,
                                    anyio.ClosedResourceError,
                                    ConnectionResetError,
                                ),
                            ):
                                while True:
                                    await anyio.sleep(0.5)
                                    await stream.send(b"x")

                        async with anyio.create_task_group() as inner:
                            inner.start_soon(dripping)
                            closed.append(await closed_by_server(stream))
                            inner.cancel_scope.cancel()
                    else:
                        closed.append(await closed_by_server(stream))

            for i, stream in enumerate(attackers):
                tg.start_soon(watch, stream, i % 30 == 0)
            base = f"http://127.0.0.1:{port}"
            for _ in range(3):
                assert (200, '{"status": "ok"}') == await get(http, base + "/healthz")
            status, text = await get(http, base + "/metrics")
            _, samples = parse(text)
            assert samples[("contact_worker_status_connections", ())] <= MAX_CONNECTIONS
            assert samples[("contact_worker_status_connections_shed_total", ())] >= 300 - 100
            with anyio.fail_after(CLOSED_WITHIN_S + 10):
                while len(closed) < 300:  # noqa: ASYNC110 - counting what the watchers saw
                    await anyio.sleep(0.05)
            # Closed without an answer: no request head ever completed.
            assert {b""} == set(closed)
            assert (200, '{"status": "ok"}') == await get(http, base + "/healthz")

    async def test_keep_alive_connection_gets_full_answers_then_closes_when_idle(
        self, tmp_path: Path
    ) -> None:
        """A client that keeps its connection open gets every answer on it; once it stays
        idle for the header timeout, the server closes it."""
        engine = idle_engine(tmp_path)
        limits = PortLimits(header_timeout_s=0.5)
        async with serve_status(engine, 0, host="127.0.0.1", limits=limits) as port:
            stream = await anyio.connect_tcp("127.0.0.1", port)
            async with stream:
                request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                await stream.send(request + request)
                got = await closed_by_server(stream)
        assert 2 == got.count(b"HTTP/1.1 200 OK")


class TestConnectionCap:
    async def test_over_the_cap_new_connection_evicts_the_oldest_idle_one(
        self, tmp_path: Path
    ) -> None:
        """At the cap, a new connection closes the oldest one with no request in a handler,
        and gets its answer."""
        engine = idle_engine(tmp_path)
        limits = PortLimits(header_timeout_s=CLOSED_WITHIN_S * 2, max_connections=3)
        async with (
            serve_status(engine, 0, host="127.0.0.1", limits=limits) as port,
            aiohttp.ClientSession() as http,
        ):
            stalled = []
            for _ in range(3):
                stream = await anyio.connect_tcp("127.0.0.1", port)
                await stream.send(STALLED_HEAD)
                stalled.append(stream)
            assert (200, '{"status": "ok"}') == await get(http, f"http://127.0.0.1:{port}/healthz")
            assert b"" == await closed_by_server(stalled[0])
            for stream in stalled:
                await stream.aclose()

    async def test_over_the_cap_with_every_connection_busy_new_one_is_closed(
        self, tmp_path: Path
    ) -> None:
        """When every connection has a request in a handler, a new connection is closed at
        once, unanswered; the busy ones are left alone and get their answers."""
        engine = idle_engine(tmp_path)
        started: list[anyio.Event] = [anyio.Event(), anyio.Event()]
        held = iter(started)
        release = anyio.Event()

        async def hold(_: web.Request) -> web.Response:
            next(held).set()
            await release.wait()
            return web.json_response({"held": True})

        def configure(app: web.Application) -> None:
            app.router.add_get("/hold", hold)

        limits = PortLimits(max_connections=2)
        async with serve_status(
            engine, 0, host="127.0.0.1", limits=limits, configure=configure
        ) as port:
            busy = []
            for event in started:
                stream = await anyio.connect_tcp("127.0.0.1", port)
                await stream.send(b"GET /hold HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                busy.append(stream)
                with anyio.fail_after(CLOSED_WITHIN_S):
                    await event.wait()
            newcomer = await anyio.connect_tcp("127.0.0.1", port)
            async with newcomer:
                with contextlib.suppress(anyio.BrokenResourceError, ConnectionResetError):
                    await newcomer.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert b"" == await closed_by_server(newcomer)
            release.set()
            for stream in busy:
                async with stream:
                    answer = await answered(stream)
                assert answer.startswith(b"HTTP/1.1 200")


async def answered(stream: anyio.abc.SocketStream) -> bytes:
    """Read one answer, up to the end of its JSON body."""
    got = b""
    with anyio.fail_after(CLOSED_WITHIN_S):
        while not got.endswith(b"}"):
            got += await stream.receive()
    return got


class TestStalledBody:
    @pytest.mark.slow
    async def test_body_that_stops_is_answered_408_and_closed(self, tmp_path: Path) -> None:
        """An ingest body that stops after one byte is answered 408 once the body timeout
        passes, nothing is stored, and the server closes the connection."""
        async with spool(tmp_path) as source:
            engine = idle_engine(tmp_path, source)
            configure = with_ingest(source, body_timeout_s=0.5)
            async with (
                serve_status(engine, 0, host="127.0.0.1", configure=configure) as port,
                aiohttp.ClientSession() as http,
            ):
                stream = await anyio.connect_tcp("127.0.0.1", port)
                async with stream:
                    await stream.send(await ingest_head(port, 100) + b"[")
                    got = await closed_by_server(stream)
                assert got.startswith(b"HTTP/1.1 408")
                assert b"request body not complete within 0.5 s" in got
                assert (200, '{"status": "ok"}') == await get(
                    http, f"http://127.0.0.1:{port}/healthz"
                )
            assert 0 == source.spool.rows
