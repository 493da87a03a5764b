"""/readyz and /metrics follow a PostgreSQL input through an outage.

The shared PostgreSQL cannot be stopped, so the worker reaches it through a TCP relay of the
test's own: closing the relay drops the worker's connections and refuses new ones, as a server
that went away does (the worker sees the same socket errors); opening it again on the same port
brings the server back.
"""

from __future__ import annotations

import socket
import urllib.parse
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import anyio.abc
import pytest

from tests.engine.probes import probed, until
from tests.engine.test_engine import stream
from tests.pg.conftest import Db
from tests.pg.test_pg_source import lines
from worker.backends.jsonl.sink import JsonlDeadLetters
from worker.backends.postgres.outbox import PgOutboxSource
from worker.backends.postgres.producer import enqueue
from worker.obs.readiness import INPUT_UNAVAILABLE
from worker.sim.gateway import SimConfig

pytestmark = pytest.mark.anyio


class Relay:
    """A TCP relay on 127.0.0.1 (a free port of its own) to ``target``, that can be closed
    (every relayed connection dropped, new ones refused) and opened again."""

    def __init__(self, target: tuple[str, int], group: anyio.abc.TaskGroup) -> None:
        self.target = target
        self.group = group
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._scope: anyio.CancelScope | None = None

    async def open(self) -> None:
        """Listen and relay until :meth:`close`."""
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port)
        scope = self._scope = anyio.CancelScope()

        async def serve() -> None:
            with scope:
                async with listener, anyio.create_task_group() as connections:
                    await listener.serve(self._relay, connections)

        self.group.start_soon(serve)

    def close(self) -> None:
        """Stop listening and drop every connection (the listening socket closes with them)."""
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None

    async def _relay(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            try:
                server = await anyio.connect_tcp(*self.target)
            except OSError:
                return
            async with server, anyio.create_task_group() as pipes:

                async def pipe(a: anyio.abc.SocketStream, b: anyio.abc.SocketStream) -> None:
                    try:
                        async for chunk in a:
                            await b.send(chunk)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        pass
                    pipes.cancel_scope.cancel()  # one side gone: the relayed connection is

                pipes.start_soon(pipe, client, server)
                pipes.start_soon(pipe, server, client)


def through(uri: str, port: int) -> str:
    """The same URI with its host and port replaced by the relay's."""
    parts = urllib.parse.urlsplit(uri)
    user = f"{parts.username}@" if parts.username else ""
    return parts._replace(netloc=f"{user}127.0.0.1:{port}").geturl()


async def test_not_ready_while_postgresql_is_unreachable_ready_again_after(
    db: Db, tmp_path: Path
) -> None:
    """While the worker's database is unreachable (its connections dropped, new ones
    refused), /readyz answers 503 ``input_unavailable`` naming the database, /healthz still
    200 and ``contact_worker_input_available`` 0; once it is reachable again /readyz is 200,
    the worker goes on and /metrics counts the reconnection."""
    changes = stream(400, 100)
    before, after = changes[:200], changes[200:]
    direct = db.uri()
    await enqueue(direct, lines(before))
    target = urllib.parse.urlsplit(direct)
    async with AsyncExitStack() as stack:
        group = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(group.cancel_scope.cancel)
        relay = Relay((target.hostname or "127.0.0.1", target.port or 5432), group)
        await relay.open()
        source = PgOutboxSource.from_uri(through(db.uri(poll_s=0.2), relay.port))
        sink = JsonlDeadLetters(str(tmp_path / "dead.jsonl"))
        async with probed(source, sink, SimConfig(known_count=100)) as worker:
            await until(lambda: worker.engine.stats.acked >= 200)
            assert (200, {"ready": True, "reason": "running"}) == await worker.readyz()
            samples = await worker.metrics()
            assert (1, 0) == (
                samples[("contact_worker_input_available", ())],
                samples[("contact_worker_input_reconnects_total", ())],
            )

            relay.close()
            body = await worker.until_readyz(503)
            assert (False, INPUT_UNAVAILABLE) == (body["ready"], body["reason"])
            assert f"postgresql://{target.username}@127.0.0.1:{relay.port}" in body["detail"]
            assert 200 == await worker.healthz()
            samples = await worker.metrics()
            assert 0 == samples[("contact_worker_input_available", ())]

            await relay.open()
            assert {"ready": True, "reason": "running"} == await worker.until_readyz(200)
            await enqueue(direct, lines(after))
            await until(lambda: worker.engine.stats.acked >= 400)
            samples = await worker.metrics()
            assert 1 == samples[("contact_worker_input_available", ())]
            assert 1 <= samples[("contact_worker_input_reconnects_total", ())]
            assert 0 == samples[("contact_worker_input_unacked_records", ())]
            assert ("contact_worker_input_partitions_held", ()) not in samples
