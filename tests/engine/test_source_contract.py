"""The engine's side of the Source contract: records read under a holding that ended are
dropped (never sent, never acknowledged), and an input's background work runs in the engine's
task group (its failure ends the run; nothing of it outlives the run)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path

import anyio
import orjson
import pytest
from anyio.abc import TaskGroup

from tests.engine.harness import settings, write_lines
from tests.engine.test_acknowledger import wait_until
from worker.backends.base import Held, HeldRecords, Record, Source, SourceError
from worker.backends.jsonl.sink import JsonlDeadLetters
from worker.backends.jsonl.source import JsonlSource
from worker.config import Secret
from worker.engine import READ_SLICE, Ending, Engine, EngineSettings, Result
from worker.sender import Sender
from worker.sim.gateway import SimConfig, Simulator, serve

pytestmark = pytest.mark.anyio


class OnePartition(Source):
    """Partition 0, held under generation 1 until the test ends the holding; one read hands
    out every record, then the input ends."""

    def __init__(self, count: int) -> None:
        self.records: list[Record] = [
            (i, orjson.dumps({"ID": i, "lastname": f"n{i}"})) for i in range(1, count + 1)
        ]
        self.generation: int | None = 1
        self.reads = 0
        self.acked: list[Hashable] = []
        self.dropped_records: list[Record] = []

    async def read(self) -> HeldRecords | None:
        self.reads += 1
        if self.reads == 1:
            return HeldRecords([Held(0, 1, self.records)])
        return None

    def current(self, partition: int, generation: int) -> bool:
        return self.generation == generation

    def dropped(self, held: Held) -> None:
        self.dropped_records += held.records

    async def ack(self, tokens: Sequence[Hashable]) -> None:
        self.acked += tokens

    def describe(self, tokens: Sequence[Hashable]) -> str:
        return ",".join(map(str, tokens))


async def run_engine(
    tmp_path: Path, source: Source, sim: Simulator, es: EngineSettings
) -> tuple[Engine, list[Result]]:
    """The engine for ``source`` against ``sim``, and where its result will be."""
    sink = JsonlDeadLetters(str(tmp_path / "dead.jsonl"))
    results: list[Result] = []
    async with serve(sim) as url:
        await sink.open()
        try:
            async with Sender(url, "demo", Secret("demo-secret"), timeout_s=5.0) as sender:
                engine = Engine(source, sink, sender, es)
                results.append(await engine.run())
        finally:
            await sink.close()
    return engine, results


async def test_records_of_an_ended_holding_are_dropped_not_sent_nor_acked(
    tmp_path: Path,
) -> None:
    """One read of 3,000 records: the engine takes the first slice, then waits for room (one
    request a second). The holding ends meanwhile (the source revokes the partition through
    the engine, its assignment listener): the rest of the read is dropped, told to the source,
    never sent nor acknowledged."""
    source = OnePartition(3000)
    sim = Simulator(SimConfig())
    es = settings(batch=10, concurrency=1, rate=1.0, max_waiting=1000)
    box: list[Engine] = []

    async def run() -> None:
        async with serve(sim) as url:
            sink = JsonlDeadLetters(str(tmp_path / "dead.jsonl"))
            await sink.open()
            try:
                async with Sender(url, "demo", Secret("demo-secret"), timeout_s=5.0) as sender:
                    engine = Engine(source, sink, sender, es)
                    box.append(engine)
                    result = await engine.run()
                    assert Ending.DRAINED == result.ending
            finally:
                await sink.close()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await wait_until(lambda: bool(box) and box[0].stats.records >= READ_SLICE)
        engine = box[0]
        assert engine is source.assignments
        assert READ_SLICE == engine.stats.records  # waiting for room: the rest not taken in
        source.generation = None  # the holding ends: what waits is forgotten
        engine.revoked([0], lambda key: True)
    rest = source.records[READ_SLICE:]
    assert rest == source.dropped_records
    assert len(rest) == engine.stats.stale
    dropped = {token for token, _ in rest}
    assert not dropped & set(source.acked)
    assert not {str(token) for token in dropped} & set(sim.contacts)
    assert set(source.acked) <= {token for token, _ in source.records[:READ_SLICE]}


class WithKeeper(Source):
    """A ``jsonl:`` input with a background keeper started in the engine's task group; the
    keeper fails once ``fail`` is set, and says whether it is running."""

    def __init__(self, path: Path, *, fail: bool = False) -> None:
        self.inner = JsonlSource(str(path))
        self.fail = fail
        self.keeper_running = False
        self.keeper_started = anyio.Event()
        self.hold = anyio.Event()

    async def open(self) -> None:
        await self.inner.open()

    def start(self, task_group: TaskGroup) -> None:
        task_group.start_soon(self._keep)

    async def _keep(self) -> None:
        self.keeper_running = True
        self.keeper_started.set()
        try:
            while True:
                await anyio.sleep(0.01)
                if self.fail:
                    raise SourceError("the keeper failed")
        finally:
            self.keeper_running = False

    async def read(self) -> Sequence[Record] | None:
        if self.fail:
            await self.hold.wait()  # a live input: only the keeper's failure ends the run
        await self.keeper_started.wait()
        return await self.inner.read()

    async def ack(self, tokens: Sequence[Hashable]) -> None:
        await self.inner.ack(tokens)

    def describe(self, tokens: Sequence[Hashable]) -> str:
        return self.inner.describe(tokens)

    async def close(self) -> None:
        await self.inner.close()


async def test_a_keeper_started_in_the_engine_is_gone_after_the_run(tmp_path: Path) -> None:
    """The keeper runs in the engine's task group: after the run (drained) it is not running."""
    path = write_lines(tmp_path / "in.jsonl", [{"ID": i, "lastname": "x"} for i in range(50)])
    async with WithKeeper(path) as source:
        _, results = await run_engine(tmp_path, source, Simulator(SimConfig()), settings())
        assert Ending.DRAINED == results[0].ending
        assert source.keeper_started.is_set()
        assert not source.keeper_running


async def test_a_keeper_failure_ends_the_run_with_its_error(tmp_path: Path) -> None:
    """A keeper that fails ends the run with its error (the command line prints it), and
    nothing of the input is left running."""
    path = write_lines(tmp_path / "in.jsonl", [{"ID": 1, "lastname": "x"}])
    async with WithKeeper(path, fail=True) as source:
        with pytest.raises(ExceptionGroup) as caught:
            await run_engine(tmp_path, source, Simulator(SimConfig()), settings())
        matched, rest = caught.value.split(SourceError)
        assert rest is None and matched is not None
        assert "the keeper failed" in str(matched.exceptions[0])
        assert not source.keeper_running
