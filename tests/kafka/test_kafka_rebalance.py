"""A rebalance at the source: exactly the partitions taken away are revoked; the kept ones go
on where they were (nothing read again); the new holder starts from the committed offsets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager

import anyio
import orjson
import pytest

from tests.kafka.conftest import Tansu
from tests.kafka.test_kafka_source import read_n, uri_of
from worker.backends.base import records_of, running
from worker.backends.kafka.producer import enqueue, init
from worker.backends.kafka.source import KafkaSource, from_uri

pytestmark = pytest.mark.anyio


class Listener:
    """Records what the source tells the engine; nothing is ever in flight."""

    def __init__(self, probe: Collection[str]) -> None:
        self.probe = probe
        self.assigned_partitions: list[int] = []
        self.revoked_partitions: list[int] = []
        self.revoked_ids: set[str] = set()

    def assigned(self, partitions: Collection[int]) -> None:
        self.assigned_partitions += partitions

    def revoked(self, partitions: Collection[int], covers: Callable[[str], bool]) -> int:
        self.revoked_partitions += partitions
        self.revoked_ids |= {key for key in self.probe if covers(key)}
        return 0

    def ids_in_flight(self) -> int:
        return 0


async def until(check: Callable[[], bool]) -> None:
    """Poll ``check`` until it holds."""
    while True:
        if check():
            return
        await anyio.sleep(0.05)


@asynccontextmanager
async def read_in_background(
    source: KafkaSource,
) -> AsyncIterator[list[tuple[object, bytes]]]:
    """``source`` running and read by a task of its own; the records it read so far."""
    records: list[tuple[object, bytes]] = []
    async with running(source), anyio.create_task_group() as group:

        async def read() -> None:
            while True:
                records.extend(records_of(await source.read()))

        group.start_soon(read)
        yield records
        group.cancel_scope.cancel()


@pytest.mark.slow
async def test_a_second_member_takes_exactly_its_partitions(tansu: Tansu, topic: str) -> None:
    """A reads all 4 partitions and acknowledges nothing; B joins: A is told "revoked" for
    exactly the partitions B gets (with the IDs of their records), keeps the others without
    reading them again, and B reads its partitions from the start (nothing was committed)."""
    uri = uri_of(tansu, topic, "&partitions=4")
    await init(uri)
    ids = [str(i) for i in range(40)]
    await enqueue(uri, [orjson.dumps({"ID": i, "lastname": "x"}) for i in ids])
    a, b = from_uri(uri), from_uri(uri)
    listener = Listener(ids)
    a.assignments = listener
    async with running(a):
        first = await read_n(a, 40)
        assert [0, 1, 2, 3] == a.held
        async with read_in_background(b) as b_records:
            with anyio.fail_after(30):
                await until(lambda: bool(b.held) and len(a.held) == 2 and len(b_records) >= 1)
            taken = set(b.held)
            assert taken == set(listener.revoked_partitions)
            assert taken.isdisjoint(a.held)
            by_partition: dict[int, set[str]] = {}
            for token, _ in first:
                p, _, key = token  # type: ignore[misc]
                by_partition.setdefault(p, set()).add(key)
            assert set().union(*(by_partition[p] for p in taken)) == listener.revoked_ids
            with anyio.fail_after(30):
                await until(lambda: len(b_records) >= sum(len(by_partition[p]) for p in taken))
            assert sorted(t[1] for t, _ in first if t[0] in taken) == sorted(  # type: ignore[index]
                t[1]
                for t, _ in b_records  # type: ignore[index]
            )
            with anyio.move_on_after(1.5):  # the kept partitions are not read again
                again = records_of(await a.read())
                pytest.fail(f"A read records again: {again}")
            assert sorted(set(a.held)) == sorted(set(range(4)) - taken)
            kept = [token for token, _ in first if token[0] in a.held]  # type: ignore[index]
            assert len(kept) == a.statistics().unacked  # the kept records are still A's


class Replays:
    """A replay listener that records the ranges a source announces."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.done: list[str] = []

    def replay_started(self, name: str, covers: Callable[[str], bool] | None) -> None:
        self.started.append(name)

    def replay_done(self, name: str) -> None:
        self.done.append(name)


@pytest.mark.slow
async def test_the_group_re_forms_only_after_requests_in_flight_end(
    tansu: Tansu, topic: str
) -> None:
    """While A has a request in flight, its revocation holds every waiting change (a hold over
    all IDs) and the group does not re-form: B gets no partition, and reads nothing, before
    A's request ended; then the hold ends with the new assignment."""
    uri = uri_of(tansu, topic, "&partitions=2")
    await init(uri)
    await enqueue(uri, [orjson.dumps({"ID": str(i), "lastname": "x"}) for i in range(20)])
    a, b = from_uri(uri), from_uri(uri)
    listener = Listener([])
    in_flight = {"ids": 1}
    listener.ids_in_flight = lambda: in_flight["ids"]  # type: ignore[method-assign]
    replays = Replays()
    a.assignments, a.replay = listener, replays
    async with running(a):
        await read_n(a, 20)
        async with read_in_background(b) as b_records:
            with anyio.fail_after(30):
                await until(lambda: "kafka:rebalance" in replays.started)
            await anyio.sleep(2)  # the request is still in flight: nothing moves
            assert ([], []) == (b.held, b_records)
            assert [0, 1] == a.held and "kafka:rebalance" not in replays.done
            in_flight["ids"] = 0
            with anyio.fail_after(30):
                await until(lambda: bool(b.held) and bool(b_records))
            assert "kafka:rebalance" in replays.done
            assert 1 == len(a.held) and set(a.held).isdisjoint(b.held)
