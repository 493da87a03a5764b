"""The engine's acknowledger: senders hand their acknowledgements over and go on sending; one
task writes them, everything settled since its last write at once, through a bounded queue."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Sequence
from pathlib import Path

import anyio
import pytest

from tests.engine.harness import expected_state, settings, write_lines
from tests.engine.test_engine import stream
from worker import engine as engine_module
from worker.backends.base import Record, Source
from worker.backends.jsonl.sink import JsonlDeadLetters
from worker.backends.jsonl.source import JsonlSource
from worker.config import Secret
from worker.engine import Ending, Engine, Result
from worker.sender import Sender
from worker.sim.gateway import SimConfig, Simulator, serve

pytestmark = pytest.mark.anyio


class HeldAcks(Source):
    """A real ``jsonl:`` source whose acknowledgements wait until the test lets them through;
    it records every ``ack`` call and notices calls that overlap."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.inner = JsonlSource(str(path))
        self.name = self.inner.name
        self.gate = anyio.Event()
        self.calls: list[list[Hashable]] = []
        self.acking = 0
        self.overlapped = False

    async def open(self) -> None:
        await self.inner.open()

    async def read(self) -> Sequence[Record] | None:
        return await self.inner.read()

    async def ack(self, tokens: Sequence[Hashable]) -> None:
        self.acking += 1
        self.overlapped |= self.acking > 1
        try:
            self.calls.append(list(tokens))
            await self.gate.wait()
            await self.inner.ack(tokens)
        finally:
            self.acking -= 1

    def describe(self, tokens: Sequence[Hashable]) -> str:
        return self.inner.describe(tokens)

    async def close(self) -> None:
        await self.inner.close()


async def run_held(
    tmp_path: Path,
    changes: list[object],
    source: HeldAcks,
    sim: Simulator,
    while_held: Callable[[], Awaitable[None]],
) -> tuple[Engine, Result]:
    """Write ``changes`` for ``source``, run the engine on it against ``sim`` (batches of 10,
    2 senders) beside ``while_held``, which runs once the first acknowledgement is held and
    opens the gate; the engine and its result."""
    write_lines(source.path, changes)
    out: list[tuple[Engine, Result]] = []

    async def run() -> None:
        async with serve(sim) as url:
            sink = JsonlDeadLetters(str(tmp_path / "dead.jsonl"))
            await source.open()
            await sink.open()
            try:
                async with Sender(url, "demo", Secret("demo-secret"), timeout_s=5.0) as sender:
                    engine = Engine(source, sink, sender, settings(batch=10, concurrency=2))
                    out.append((engine, await engine.run()))
            finally:
                await sink.close()
                await source.close()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await wait_until(lambda: len(source.calls) == 1)
        await while_held()
    return out[0]


async def wait_until(predicate: object, timeout_s: float = 20.0) -> None:
    with anyio.fail_after(timeout_s):
        while not predicate():  # type: ignore[operator]  # noqa: ASYNC110
            await anyio.sleep(0.005)


async def test_senders_go_on_while_an_acknowledgement_is_written(tmp_path: Path) -> None:
    """While the first acknowledgement is held, requests go on; the next write carries
    everything settled meanwhile; writes never overlap; every record is acknowledged once."""
    changes = stream(600, 600, seed=3)
    source = HeldAcks(tmp_path / "in.jsonl")
    sim = Simulator(SimConfig())

    async def while_held() -> None:
        # The first write is held: the senders carry on regardless.
        await wait_until(lambda: sim.stats.contacts_applied >= 300)
        assert 1 == len(source.calls)
        source.gate.set()

    engine, result = await run_held(tmp_path, changes, source, sim, while_held)
    assert Ending.DRAINED == result.ending
    assert expected_state(changes) == sim.contacts
    assert not source.overlapped
    acked = [token for call in source.calls for token in call]
    assert sorted(acked) == list(range(600))  # each record once (tokens are line numbers)
    assert len(source.calls[1]) >= 300 - len(source.calls[0])
    assert 600 == engine.stats.acked


async def test_the_acknowledgement_queue_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the store not taking acknowledgements, the senders stop once ACK_BACKLOG changes
    wait for one; once it takes them, the run finishes with everything acknowledged."""
    monkeypatch.setattr(engine_module, "ACK_BACKLOG", 50)
    changes = stream(1000, 1000, seed=4)
    source = HeldAcks(tmp_path / "in.jsonl")
    sim = Simulator(SimConfig())

    async def while_held() -> None:
        held = len(source.calls[0])
        await anyio.sleep(0.5)  # ample time to send the rest, were the senders not held
        # The write held, the 50 queued behind it, and one batch per sender on its way.
        assert sim.stats.contacts_applied <= held + 50 + 2 * 10
        source.gate.set()

    _, result = await run_held(tmp_path, changes, source, sim, while_held)
    assert Ending.DRAINED == result.ending
    assert expected_state(changes) == sim.contacts
    assert sorted(t for call in source.calls for t in call) == list(range(1000))


@pytest.mark.parametrize("checkpoint", [False, True])
async def test_a_file_without_checkpoint_is_acknowledged_by_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpoint: bool
) -> None:
    """A ``jsonl:`` file read without a checkpoint keeps nothing of which lines are done: the
    engine builds no token lists and acknowledges applied and dead-lettered changes by count
    (a merged change keeps only its first and last line, for its dead letter to name); with a
    checkpoint, every line by token. Either way each record is acknowledged once, and the run
    drains with the API's state right."""
    from tests.engine.harness import run_engine

    by_token: list[Hashable] = []
    by_count: list[int] = []
    ack, ack_count = JsonlSource.ack, JsonlSource.ack_count

    async def record_ack(self: JsonlSource, tokens: Sequence[Hashable]) -> None:
        by_token.extend(tokens)
        await ack(self, tokens)

    async def record_count(self: JsonlSource, count: int) -> None:
        by_count.append(count)
        await ack_count(self, count)

    monkeypatch.setattr(JsonlSource, "ack", record_ack)
    monkeypatch.setattr(JsonlSource, "ack_count", record_count)
    unknown = frozenset(range(9001, 9011))
    changes = stream(500, 200, seed=5, unknown=unknown)
    known = frozenset(str(n) for n in range(1, 201))
    run = await run_engine(
        tmp_path, changes, SimConfig(known_ids=known), settings(batch=10), checkpoint=checkpoint
    )
    assert Ending.DRAINED == run.result.ending
    assert expected_state([c for c in changes if int(c["ID"]) not in unknown]) == run.sim.contacts
    dead = sum(1 for c in changes if int(c["ID"]) in unknown)  # changes, each a token
    assert 0 < dead and {"not_found"} == {d["reason"] for d in run.dead}
    assert 500 == run.engine.stats.acked == len(by_token) + sum(by_count)
    assert run.source is not None and 500 == run.source.lines_acked
    if checkpoint:
        assert [] == by_count and sorted(by_token) == list(range(500))
    else:
        assert [] == by_token and 500 == sum(by_count)
