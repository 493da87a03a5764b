"""Group commit of acknowledgements: merged writes, and nobody told "acked" too early."""

from __future__ import annotations

from collections.abc import Hashable

import anyio
import pytest

from worker.sources.ack_group import AckGroup
from worker.sources.base import SourceError

pytestmark = pytest.mark.anyio


class Store:
    """Writes that wait for a gate, so the test decides when a round trip ends."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.writes: list[list[Hashable]] = []
        self.durable: set[Hashable] = set()
        self.gate = anyio.Event()
        self.fail_on = fail_on

    async def write(self, tokens: list[Hashable]) -> None:
        self.writes.append(list(tokens))
        await self.gate.wait()
        if self.fail_on is not None and self.fail_on in tokens:
            raise RuntimeError("store refused")
        self.durable.update(tokens)


async def test_acks_arriving_during_a_write_go_together_in_the_next() -> None:
    store = Store()
    group = AckGroup(store.write)
    returned: list[int] = []

    async def ack(n: int) -> None:
        await group.ack([n, n + 100])
        assert {n, n + 100} <= store.durable, "returned before its write completed"
        returned.append(n)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ack, 1)
        await anyio.wait_all_tasks_blocked()
        for n in (2, 3, 4):
            tg.start_soon(ack, n)
        await anyio.wait_all_tasks_blocked()
        assert returned == []
        assert store.writes == [[1, 101]], "the others wait for the first write"
        store.gate.set()
    assert sorted(returned) == [1, 2, 3, 4]
    assert store.writes == [[1, 101], [2, 102, 3, 103, 4, 104]]
    assert group.writes == 2


async def test_a_lone_ack_is_written_at_once() -> None:
    store = Store()
    store.gate.set()
    group = AckGroup(store.write)
    await group.ack(["a"])
    await group.ack([])
    await group.ack(["b"])
    assert store.writes == [["a"], ["b"]]


async def test_a_failed_write_fails_those_waiting_for_it_and_later_acks() -> None:
    store = Store(fail_on=2)
    group = AckGroup(store.write)
    outcomes: dict[int, str] = {}

    async def ack(n: int) -> None:
        try:
            await group.ack([n])
        except RuntimeError:
            outcomes[n] = "store error"
        except SourceError:
            outcomes[n] = "source error"
        else:
            outcomes[n] = "ok"

    async with anyio.create_task_group() as tg:
        tg.start_soon(ack, 1)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(ack, 2)
        tg.start_soon(ack, 3)
        await anyio.wait_all_tasks_blocked()
        store.gate.set()
    # 1 went alone and succeeded; 2 and 3 shared the failing write: its writer sees the
    # store's error, the other a SourceError; nothing of theirs is durable.
    assert outcomes[1] == "ok"
    assert sorted([outcomes[2], outcomes[3]]) == ["source error", "store error"]
    assert store.durable == {1}
    with pytest.raises(SourceError):
        await group.ack([4])


async def test_acks_of_one_turn_of_the_loop_go_in_one_write() -> None:
    """Senders whose answers came together ack in the same turn: one round trip for all."""
    store = Store()
    store.gate.set()
    group = AckGroup(store.write)
    async with anyio.create_task_group() as tg:
        for n in range(5):
            tg.start_soon(group.ack, [n])
    assert [sorted(w) for w in store.writes] == [[0, 1, 2, 3, 4]]
    assert store.durable == {0, 1, 2, 3, 4}


async def test_a_cancelled_leader_leaves_the_queued_acks_to_the_others() -> None:
    """Cancelled before its write, the first caller's tokens stay queued and the next caller
    writes them with its own: nobody waits for a write that never comes."""
    store = Store()
    store.gate.set()
    group = AckGroup(store.write)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await group.ack(["lost-leader"])
    assert store.writes == []
    await group.ack(["next"])
    assert store.writes == [["lost-leader", "next"]]
