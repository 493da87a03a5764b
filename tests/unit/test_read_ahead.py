"""A read started early runs in the task group it is given, never as a loose task."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from worker.backends.ahead import ReadAhead, ReadAheadAbandoned

pytestmark = pytest.mark.anyio


async def test_its_outcome_is_taken_later() -> None:
    async def read() -> list[int]:
        await anyio.sleep(0.01)
        return [1, 2]

    async with anyio.create_task_group() as tg:
        ahead = ReadAhead(tg, read, limit_s=5)
        assert not ahead.done()
        assert [1, 2] == await ahead.wait()
    assert ahead.done() and ahead.error is None and [1, 2] == ahead.result()


async def test_its_error_is_raised_to_whoever_takes_it_not_to_the_group() -> None:
    async def read() -> list[int]:
        raise OSError("connection reset")

    async with anyio.create_task_group() as tg:
        ahead = ReadAhead(tg, read, limit_s=5)
        with pytest.raises(OSError, match="connection reset"):
            await ahead.wait()
    assert isinstance(ahead.error, OSError)


async def test_the_group_waits_for_it_and_a_shielded_read_outlives_the_cancellation() -> None:
    """Shielded: the broker's answer is not lost when the run ends while it is on its way."""
    answered = anyio.Event()

    async def read() -> list[int]:
        await anyio.sleep(0.05)
        answered.set()
        return [7]

    async with anyio.create_task_group() as tg:
        ahead = ReadAhead(tg, read, limit_s=5, shield=True)
        await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    assert answered.is_set()
    assert [7] == ahead.result()


async def test_an_unshielded_read_ends_with_the_group_as_abandoned() -> None:
    async def read() -> list[int]:
        await anyio.sleep(10)
        return [7]

    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            ahead = ReadAhead(tg, read, limit_s=5)
            await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
    assert ahead.done()
    assert isinstance(ahead.error, ReadAheadAbandoned)
    with pytest.raises(ReadAheadAbandoned):
        ahead.result()


async def test_a_read_past_its_limit_is_abandoned_even_shielded() -> None:
    async def read() -> list[int]:
        await anyio.sleep(10)
        return [7]

    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            ahead = ReadAhead(tg, read, limit_s=0.05, shield=True)
            tg.cancel_scope.cancel()
    assert isinstance(ahead.error, ReadAheadAbandoned)
    assert "0.05" in str(ahead.error)


async def test_cancelling_a_waiter_leaves_the_read_running() -> None:
    async def read() -> list[int]:
        await anyio.sleep(0.05)
        return [3]

    async with anyio.create_task_group() as tg:
        ahead = ReadAhead(tg, read, limit_s=5)
        with anyio.move_on_after(0.01):
            await ahead.wait()
        assert not ahead.done()
        assert await ahead.settle(1.0)
    assert [3] == ahead.result()


async def test_settle_says_whether_it_ended_in_time() -> None:
    async def read() -> list[int]:
        await anyio.sleep(0.5)
        return []

    async with anyio.create_task_group() as tg:
        ahead = ReadAhead(tg, read, limit_s=5)
        assert not await ahead.settle(0.01)
        tg.cancel_scope.cancel()
