"""The one interface every input implements."""

from __future__ import annotations

import abc
from collections.abc import Callable, Hashable, Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

Record = tuple[Hashable, bytes]
"""A source record: the token that acknowledges it, and the JSON text of one change."""


class SourceError(Exception):
    """The source cannot be opened or read (bad path, bad checkpoint, broker gone)."""


NOTHING_LOST: Mapping[str, int] = MappingProxyType({})


class SourceStatistics(NamedTuple):
    """What an input says about itself (read by /readyz and /metrics); the defaults fit an
    input with nothing to report."""

    available: bool = True
    """False while the input cannot be read or acknowledged (its server is unreachable); it
    reconnects meanwhile, and is available again after its first success."""
    problem: str = ""
    """Why it is not available: the failing operations and their last errors."""
    reconnects: int = 0
    """Outages the input set out to reconnect after (one per failing operation's streak)."""
    unacked: int = 0
    """Records handed to the engine and not acknowledged yet."""
    partitions_held: int | None = None
    """Partitions this replica reads now (None: the input is not partitioned)."""
    leases_lost: Mapping[str, int] = NOTHING_LOST
    """Leases lost to expiry or to another replica, by kind (``partition``, ``row``); empty
    for inputs without leases."""
    spool_depth: int | None = None
    """Changes stored in the input and not acknowledged, read or not (None: not known)."""


class Outages:
    """Which of an input's operations fail now, and why: bookkeeping for ``statistics()``.

    Each operation that retries its failures (read, ack, a lease keeper) reports every failure
    and its next success under its own name, so one that recovered does not hide another that
    still fails.
    """

    def __init__(self) -> None:
        self._failing: dict[str, str] = {}
        self.started = 0
        """Streaks of failures begun, over all operations."""

    def failed(self, operation: str, error: str) -> None:
        """``operation`` failed with ``error`` (and will be retried)."""
        if operation not in self._failing:
            self.started += 1
        self._failing[operation] = error

    def recovered(self, operation: str) -> None:
        """``operation`` succeeded."""
        self._failing.pop(operation, None)

    @property
    def problem(self) -> str:
        """The failing operations with their last errors; empty while none fails."""
        return "; ".join(f"{op}: {error}" for op, error in sorted(self._failing.items()))


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

    files_by_key: bool = False
    """Whether the input files records under a key beside the change (a column, a partition's
    stream): the engine then asks :meth:`misfiled` about every valid change."""

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

    def misfiled(self, token: Hashable, key: str) -> str | None:
        """Why the valid change with coalescing key ``key`` does not belong where the input
        filed its record, or None. Such a change is dead-lettered ``invalid`` (and its record
        acknowledged), never sent: the input ordered and partitioned it by the other key."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Persist progress and let go of resources."""

    def statistics(self) -> SourceStatistics:
        """The input's state now (cheap, no I/O: called on every probe and scrape)."""
        return SourceStatistics()
