"""A read started early, as background work in the engine's task group.

A broker input may start its next read while the engine takes in the page it just handed out
(one round trip less to wait for in a backlog). That read runs in the task group given to
``Source.start``, never as a loose task: when the run ends, the group waits for it. Once the
broker has answered, what it brought is pending at this consumer, so the read is shielded from
the group's cancellation when the input asks for it (a cancelled read would lose the answer and
leave the entries to wait for a claim timeout), but only for ``limit_s``: past that it is
abandoned as failed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import anyio
from anyio.abc import TaskGroup

T = TypeVar("T")


class ReadAheadAbandoned(Exception):
    """The read ahead was given up: past its limit, or cancelled with the run."""


class ReadAhead(Generic[T]):
    """One read, started at once in ``task_group``; its outcome is taken later, once."""

    def __init__(
        self,
        task_group: TaskGroup,
        read: Callable[[], Awaitable[T]],
        *,
        limit_s: float,
        shield: bool = False,
        name: str = "read ahead",
    ) -> None:
        self._finished = anyio.Event()
        self._result: T | None = None
        self._error: Exception | None = None
        self._limit_s = limit_s
        self._shield = shield
        task_group.start_soon(self._run, read, name=name)

    async def _run(self, read: Callable[[], Awaitable[T]]) -> None:
        ended = False
        try:
            with anyio.CancelScope(shield=self._shield) as scope:
                scope.deadline = anyio.current_time() + self._limit_s
                try:
                    self._result = await read()
                except Exception as exc:
                    self._error = exc
                ended = True
            if not ended:  # this scope's own deadline
                self._error = ReadAheadAbandoned(f"no answer within {self._limit_s} s")
        finally:
            if not ended and self._error is None:  # the task group's cancellation
                self._error = ReadAheadAbandoned("cancelled with the run")
            self._finished.set()

    def done(self) -> bool:
        """Whether the read has ended, with records or with an error."""
        return self._finished.is_set()

    @property
    def error(self) -> Exception | None:
        """Why the read failed, once done; None if it succeeded (or is still on its way)."""
        return self._error

    def result(self) -> T:
        """What the read brought; raises its error. Only once done."""
        if not self._finished.is_set():
            raise RuntimeError("the read ahead is still on its way")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    async def wait(self) -> T:
        """What the read brought, waiting for it; raises its error. Cancelling the waiter
        leaves the read running (its outcome stays to be taken)."""
        await self._finished.wait()
        return self.result()

    async def settle(self, timeout_s: float) -> bool:
        """Wait at most ``timeout_s`` for the read to end; whether it did."""
        with anyio.move_on_after(timeout_s):
            await self._finished.wait()
        return self._finished.is_set()
