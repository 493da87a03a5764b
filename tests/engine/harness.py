"""Running the real engine against the simulated gateway over real sockets, in-process."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson

from worker.backends.jsonl.sink import JsonlDeadLetters
from worker.backends.jsonl.source import JsonlSource
from worker.config import Secret
from worker.core.backoff import Backoff
from worker.core.batch import BatchLimits
from worker.core.scheduler import SchedulerSettings
from worker.engine import Engine, EngineSettings, Result
from worker.sender import Sender
from worker.sim.gateway import SimConfig, Simulator, serve


@dataclass
class Run:
    """What a run left behind: the result, the engine's counters, the API's state, the DLQ."""

    result: Result
    engine: Engine
    sim: Simulator
    dead: list[dict[str, Any]] = field(default_factory=list)
    source: JsonlSource | None = None


def write_lines(path: Path, changes: Iterable[dict[str, Any] | bytes]) -> Path:
    """A JSONL file of these changes (bytes are written as they are)."""
    path.write_bytes(
        b"".join((c if isinstance(c, bytes) else orjson.dumps(c)) + b"\n" for c in changes)
    )
    return path


def read_dead(path: Path) -> list[dict[str, Any]]:
    """The dead letters in a jsonl: sink."""
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


def settings(
    *,
    batch: int = 10,
    linger_s: float = 0.01,
    rate: float = 0.0,
    concurrency: int = 4,
    max_retries: int = 0,
    backoff: Backoff | None = None,
    max_waiting: int = 50_000,
    **scheduler_options: Any,
) -> EngineSettings:
    """Engine settings tuned for fast tests (short linger, short backoff)."""
    return EngineSettings(
        SchedulerSettings(
            limits=BatchLimits(batch, 1 << 20, linger_s),
            backoff=backoff or Backoff(base_s=0.01, cap_s=0.1),
            max_waiting=max_waiting,
            max_retries=max_retries,
            **scheduler_options,
        ),
        rate=rate,
        concurrency=concurrency,
        drain_timeout_s=5.0,
        handle_signals=False,
    )


async def run_engine(
    tmp_path: Path,
    changes: Iterable[dict[str, Any] | bytes],
    sim_config: SimConfig,
    engine_settings: EngineSettings | None = None,
    *,
    client_secret: str = "demo-secret",
    checkpoint: bool = False,
    request_timeout_s: float = 5.0,
    watch: Callable[[Engine], Awaitable[None]] | None = None,
) -> Run:
    """Write the changes to a file and run the worker on it until it ends."""
    source_path = write_lines(tmp_path / "in.jsonl", changes)
    dlq_path = tmp_path / "dead.jsonl"
    sim = Simulator(sim_config)
    async with serve(sim) as url:
        source = JsonlSource(
            str(source_path), checkpoint=str(tmp_path / "cp.json") if checkpoint else None
        )
        sink = JsonlDeadLetters(str(dlq_path))
        await source.open()
        await sink.open()
        es = engine_settings or settings()
        try:
            async with Sender(
                url,
                sim_config.client_id,
                Secret(client_secret),
                concurrency=es.concurrency,
                timeout_s=request_timeout_s,
            ) as sender:
                engine = Engine(source, sink, sender, es)
                if watch is None:
                    result = await engine.run()
                else:  # a test looking at the engine while it runs
                    async with anyio.create_task_group() as group:
                        group.start_soon(watch, engine)
                        result = await engine.run()
                        group.cancel_scope.cancel()
        finally:
            await sink.close()
            await source.close()
    return Run(result, engine, sim, read_dead(dlq_path), source)


def expected_state(changes: Iterable[dict[str, Any] | bytes]) -> dict[str, dict[str, Any]]:
    """What a correct worker leaves at the API: per ID, the merged fields, later wins."""
    state: dict[str, dict[str, Any]] = {}
    for change in changes:
        if isinstance(change, bytes):
            continue
        fields = {k: v for k, v in change.items() if k != "ID"}
        state.setdefault(str(change["ID"]), {}).update(fields)
    return state
