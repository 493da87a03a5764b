"""Replay after a crash (DESIGN 9), for every input: the situation a crashed worker leaves, a
run of the real engine on it, and the check that no older value is applied after a newer one.

The situation: a backlog where a few *trap* contacts have an old change near the start and a
newer one near the end, with many other contacts in between (so that they come in different
reads). The crashed run read all of it and had applied the traps' newer values; none of it was
acknowledged. A restart that sent a trap's old change before reading its newer one would move
the contact back (in the gateway's history: 2, then 1, then 2 again).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
import structlog

from tests.engine.harness import settings
from worker.backends.base import Source
from worker.backends.jsonl.sink import JsonlDeadLetters
from worker.config import Secret
from worker.engine import Engine, EngineSettings, Result
from worker.sender import Sender
from worker.sim.gateway import CONTACT_PATH, SimConfig, Simulator, serve

TRAPS = tuple(range(1, 9))
"""The contacts whose old change comes first and newer change last (in both partitions of
two: 4 to 7 in 0, the others in 1)."""


def backlog(filler: int) -> list[dict[str, Any]]:
    """The changes: each trap's old value, ``filler`` changes of other contacts, each trap's
    newer value (``extra1`` is the per-contact sequence number)."""
    old = [{"ID": i, "extra1": "1", "unsubscribed": False} for i in TRAPS]
    middle = [{"ID": 100 + i, "extra1": "1", "lastname": f"n{i}"} for i in range(filler)]
    new = [{"ID": i, "extra1": "2", "unsubscribed": True} for i in TRAPS]
    return old + middle + new


def lines(changes: list[dict[str, Any]]) -> list[bytes]:
    """The JSON text of each change."""
    return [orjson.dumps(c) for c in changes]


def sim_config() -> SimConfig:
    """A gateway that knows every contact of :func:`backlog` and records what it applied."""
    return SimConfig(known_count=100_000, record_history=True)


async def seed_applied(url: str, config: SimConfig) -> None:
    """What the crashed run had applied: the traps' newer values, through the real API."""
    body = orjson.dumps([{"ID": i, "extra1": "2", "unsubscribed": True} for i in TRAPS])
    headers = {
        "X-Client-Id": config.client_id,
        "X-Client-Secret": config.client_secret,
        "Content-Type": "application/json",
    }
    async with (
        aiohttp.ClientSession() as session,
        session.patch(url + CONTACT_PATH, data=body, headers=headers) as resp,
    ):
        assert 204 == resp.status, await resp.text()


def regressions(history: dict[str, list[dict[str, Any]]]) -> list[tuple[str, list[int]]]:
    """The contacts whose sequence numbers, as applied, went backwards at some point."""
    out = []
    for key, objs in history.items():
        seqs = [int(o["extra1"]) for o in objs if "extra1" in o]
        if seqs != sorted(seqs):
            out.append((key, seqs))
    return out


def expected(changes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per contact, the merged fields, later wins."""
    state: dict[str, dict[str, Any]] = {}
    for change in changes:
        state.setdefault(str(change["ID"]), {}).update(
            {k: v for k, v in change.items() if k != "ID"}
        )
    return state


@dataclass
class ReplayRun:
    """What a replay run left: the result, the engine, the gateway, the log events."""

    result: Result
    engine: Engine
    sim: Simulator
    logs: list[dict[str, Any]] = field(default_factory=list)

    def events(self, name: str) -> list[dict[str, Any]]:
        """The log events of this name."""
        return [e for e in self.logs if e["event"] == name]


async def run_replay(
    tmp_path: Path,
    source: Source,
    acked: int,
    *,
    engine_settings: EngineSettings | None = None,
    during: Callable[[Engine], Awaitable[None]] | None = None,
    timeout_s: float = 60.0,
    until_acked: bool = True,
) -> ReplayRun:
    """Seed the gateway with what the crashed run applied, open ``source``, run the engine
    until ``acked`` records are acknowledged (or the input ends), then shut it down. Without
    ``until_acked`` (a finite input), the run ends on its own, drained."""
    config = sim_config()
    sim = Simulator(config)
    es = engine_settings or settings(batch=10, concurrency=4)
    sink = JsonlDeadLetters(str(tmp_path / "dead.jsonl"))
    with structlog.testing.capture_logs() as logs:
        async with serve(sim) as url:
            await seed_applied(url, config)
            await source.open()
            try:
                await sink.open()
                async with Sender(url, config.client_id, Secret(config.client_secret)) as sender:
                    engine = Engine(source, sink, sender, es)

                    async def stop_when_acked() -> None:
                        while engine.stats.acked < acked:  # noqa: ASYNC110 - counters
                            await anyio.sleep(0.005)
                        engine.shutdown()

                    with anyio.fail_after(timeout_s):
                        async with anyio.create_task_group() as tg:
                            if until_acked:
                                tg.start_soon(stop_when_acked)
                            if during is not None:
                                tg.start_soon(during, engine)
                            result = await engine.run()
                            tg.cancel_scope.cancel()
            finally:
                await sink.close()
                await source.close()
    return ReplayRun(result, engine, sim, list(logs))
