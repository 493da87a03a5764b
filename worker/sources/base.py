"""The one interface every input implements."""

from __future__ import annotations

import abc
from collections.abc import Callable, Hashable, Sequence

Record = tuple[Hashable, bytes]
"""A source record: the token that acknowledges it, and the JSON text of one change."""


class SourceError(Exception):
    """The source cannot be opened or read (bad path, bad checkpoint, broker gone)."""


class EnqueueStopped(SourceError):
    """Writing to an input failed after some changes were written (the message says how many):
    a command that stopped half-way (exit 1), not a setting to fix (exit 2)."""


class Source(abc.ABC):
    """Where changes come from, and where their acknowledgements go back to.

    ``read`` hands out records in source order; ``ack`` is called once per record token, only
    after the change it carried was applied or durably dead-lettered, in any order.
    """

    name: str = "source"

    revoke: Callable[[Callable[[str], bool]], int] | None = None
    """Set by the engine: a partitioned source calls it with a predicate on contact IDs when it
    loses a partition; the engine forgets those waiting changes (unacknowledged) and returns how
    many. Requests already in flight still finish."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect, position at the first record not yet acknowledged."""

    @abc.abstractmethod
    async def read(self) -> Sequence[Record] | None:
        """The next records, waiting for some; None at the end of a finite input."""

    @abc.abstractmethod
    async def ack(self, tokens: Sequence[Hashable]) -> None:
        """These records are done with: applied or dead-lettered."""

    @abc.abstractmethod
    def describe(self, tokens: Sequence[Hashable]) -> str:
        """Where these records came from, for dead letters (e.g. ``in.jsonl:17``)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Persist progress and let go of resources."""
