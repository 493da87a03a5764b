"""A running worker as its probes see it: the engine on an input, the simulated API, and the
status port on 127.0.0.1, asked over real sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio

from tests.engine.harness import settings
from tests.engine.test_status import Samples, parse
from worker.backends.base import Source
from worker.config import Secret
from worker.deadletters.base import DeadLetterSink
from worker.engine import Engine, EngineSettings, Result
from worker.obs.http import serve_status
from worker.sender import Sender
from worker.sim.gateway import SimConfig, Simulator, serve

WAIT_S = 60.0
"""How long a test waits for a probe's answer to turn: generous, never asserted."""


@dataclass
class Probed:
    """The worker under test, and a client of its status port."""

    engine: Engine
    sim: Simulator
    base: str
    http: aiohttp.ClientSession

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        """/readyz now: the status and the body."""
        async with self.http.get(self.base + "/readyz") as resp:
            return resp.status, await resp.json()

    async def healthz(self) -> int:
        """/healthz's status now."""
        async with self.http.get(self.base + "/healthz") as resp:
            return resp.status

    async def metrics(self) -> Samples:
        """/metrics now, parsed."""
        async with self.http.get(self.base + "/metrics") as resp:
            return parse(await resp.text())[1]

    async def until_readyz(self, status: int) -> dict[str, Any]:
        """Ask /readyz until it answers ``status``; that answer's body."""
        with anyio.fail_after(WAIT_S):
            while True:
                got, body = await self.readyz()
                if got == status:
                    return body
                await anyio.sleep(0.05)


async def until(predicate: Callable[[], bool]) -> None:
    """Wait until the predicate over other tasks' counters holds."""
    with anyio.fail_after(WAIT_S):
        while not predicate():  # noqa: ASYNC110 - polling counters of other tasks
            await anyio.sleep(0.01)


@asynccontextmanager
async def probed(
    source: Source,
    sink: DeadLetterSink,
    config: SimConfig,
    engine_settings: EngineSettings | None = None,
) -> AsyncIterator[Probed]:
    """Open the input and the sink, run the engine and the status port for the block, then
    shut the engine down (the inputs here never end) and close everything."""
    sim = Simulator(config)
    es = engine_settings or settings(batch=20, concurrency=2)
    results: list[Result] = []
    async with serve(sim) as url:
        await source.open()
        await sink.open()
        try:
            async with (
                Sender(url, config.client_id, Secret(config.client_secret), timeout_s=5) as sender,
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
            ):
                engine = Engine(source, sink, sender, es)
                async with (
                    serve_status(engine, 0, host="127.0.0.1") as port,
                    anyio.create_task_group() as tg,
                ):

                    async def drive() -> None:
                        results.append(await engine.run())

                    tg.start_soon(drive)
                    yield Probed(engine, sim, f"http://127.0.0.1:{port}", http)
                    with anyio.fail_after(WAIT_S):
                        engine.shutdown()
                        await until(lambda: bool(results))
        finally:
            await sink.close()
            await source.close()
