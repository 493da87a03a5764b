"""Group commit of acknowledgements: acks that arrive while one is being written go together.

Each sender acknowledges its own batch. Against a store, one acknowledgement is one round trip
(a ``DELETE``, an ``XACK``) whose cost barely depends on how many records it carries, so with
several senders the round trips, not the records, set the cost. :class:`AckGroup` writes the
first acknowledgement at once and queues those that come while it is in flight; the next
write carries all of them. Every caller returns only once a write holding its records has
completed (or raises what that write raised): nothing is reported acknowledged before it is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Sequence

import anyio

from worker.sources.base import SourceError


class AckGroup:
    """Serialises writes of acknowledgements and merges those that wait."""

    def __init__(self, write: Callable[[list[Hashable]], Awaitable[None]]) -> None:
        self._write = write
        self._queued: list[Hashable] = []
        self._writing = False
        self._started = 0
        """Writes started so far; the next one carries everything queued now."""
        self._finished = 0
        self._done = anyio.Event()
        self._error: BaseException | None = None
        self.writes = 0
        """Writes made, for tests and statistics."""

    async def ack(self, tokens: Sequence[Hashable]) -> None:
        """Return once a write holding ``tokens`` completed; raise if one failed."""
        if not tokens:
            return
        self._raise_error()
        self._queued.extend(tokens)
        mine = self._started + 1
        while self._finished < mine:
            if self._writing:
                done = self._done
                await done.wait()
                self._raise_error()
            else:
                await self._flush()

    async def _flush(self) -> None:
        self._writing = True
        try:
            # One turn of the event loop first: senders whose answers came in together
            # acknowledge together, in this write.
            await anyio.lowlevel.checkpoint()
        except BaseException:
            self._writing = False
            self._wake_all()
            raise
        batch, self._queued = self._queued, []
        self._started += 1
        try:
            await self._write(batch)
            self.writes += 1
        except BaseException as exc:
            # Whatever stopped this write stops those waiting for it: the error is the
            # store's (transient ones are retried inside ``write``) or a cancellation.
            self._error = exc
            raise
        finally:
            self._finished = self._started
            self._writing = False
            self._wake_all()

    def _wake_all(self) -> None:
        self._done.set()
        self._done = anyio.Event()

    def _raise_error(self) -> None:
        error = self._error
        if error is None:
            return
        if isinstance(error, Exception):
            raise SourceError(f"acknowledging failed: {error}") from error
        raise SourceError("acknowledging was interrupted")
