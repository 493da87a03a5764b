"""The one interface every input implements."""

from __future__ import annotations

import abc
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Hashable,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, NamedTuple, Protocol, Self, TypeVar

import anyio
from anyio.abc import TaskGroup

if TYPE_CHECKING:
    from worker.limiter import SharedRate

# Re-exported: the inputs import them from here.
from worker.core.records import NumberedRecords as NumberedRecords
from worker.core.records import Record as Record
from worker.errors import EnqueueStopped as EnqueueStopped
from worker.errors import SourceError as SourceError


class Held(NamedTuple):
    """Records of one partition, read under one holding of it (its ``generation``)."""

    partition: int
    generation: int
    records: Sequence[Record]


class HeldRecords(list[Held]):
    """What a partitioned input's ``read`` returns: its records grouped by the holding they
    were read under, so that the engine drops those whose holding ended before it took them
    in (:meth:`Source.current`); in each group, in source order."""

    __slots__ = ()

    def flat(self) -> list[Record]:
        """Every record, group after group (for callers that do not check holdings)."""
        return [record for held in self for record in held.records]


def records_of(read: Sequence[Record] | HeldRecords) -> Sequence[Record]:
    """The records of one ``read``, whatever its shape (for callers that do not check
    holdings: tools and tests)."""
    return read.flat() if isinstance(read, HeldRecords) else read


class AssignmentListener(Protocol):
    """Who hears which partitions a partitioned input reads (the engine).

    An input with a group protocol of its own (leases, advisory locks, a broker's consumer
    group) calls it as partitions come and go.
    """

    def assigned(self, partitions: Collection[int]) -> None:
        """These partitions are read from now on."""

    def revoked(self, partitions: Collection[int], covers: Callable[[str], bool]) -> int:
        """These partitions are no longer read: forget the waiting changes of the contact IDs
        ``covers`` selects (unacknowledged: the next holder sends them); how many were
        forgotten. Requests already in flight still finish."""
        ...

    def ids_in_flight(self) -> int:
        """Contact IDs with a request in flight now (retries waiting included): an input
        whose group protocol lets it wait for them before giving partitions up asks this."""
        ...


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


class ReplayListener(Protocol):
    """Who hears of a source's replay ranges (the engine; DESIGN 9).

    A replay range is what may have been read before a crash: the records after a checkpoint,
    the rows a spool held at the start, pending stream entries, claimed outbox rows. The
    listener holds the IDs a range covers (nothing of them is sent) until the range was read.
    """

    def replay_started(self, name: str, covers: Callable[[str], bool] | None) -> None:
        """Called before the first record of the range ``name`` is handed out; ``covers``
        selects the contact IDs it may hold (None: every ID)."""

    def replay_done(self, name: str) -> None:
        """Called once every record of the range was handed out by an earlier ``read``
        (the engine has taken them in), or the range was given up (a partition lost)."""


class LineChunks:
    """The producer side's loop: non-blank change lines, without their line endings and
    otherwise as they are (validation is the worker's job), written in order in chunks."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.written = 0
        """Lines the writer took so far (for the message when it fails half-way)."""

    async def write(
        self,
        lines: AsyncIterable[bytes] | Iterable[bytes],
        writer: Callable[[list[bytes]], Awaitable[object]],
    ) -> int:
        """Hand the lines to ``writer`` ``size`` at a time; the count written."""
        chunk: list[bytes] = []
        if isinstance(lines, AsyncIterable):
            async for line in lines:
                if self._add(chunk, line) >= self.size:
                    chunk = await self._flush(chunk, writer)
        else:
            for line in lines:
                if self._add(chunk, line) >= self.size:
                    chunk = await self._flush(chunk, writer)
        await self._flush(chunk, writer)
        return self.written

    def failed(self, message: str) -> SourceError:
        """The error for a write that failed: :class:`EnqueueStopped` once anything was
        written, else a :class:`SourceError`."""
        return (EnqueueStopped if self.written else SourceError)(message)

    @staticmethod
    def _add(chunk: list[bytes], line: bytes) -> int:
        line = line.rstrip(b"\r\n")
        if line and not line.isspace():
            chunk.append(line)
        return len(chunk)

    async def _flush(
        self, chunk: list[bytes], writer: Callable[[list[bytes]], Awaitable[object]]
    ) -> list[bytes]:
        if chunk:
            await writer(chunk)
            self.written += len(chunk)
        return []


class Source(abc.ABC):
    """Where changes come from, and where their acknowledgements go back to.

    ``read`` hands out records in source order; ``ack`` is called once per record token, only
    after the change it carried was applied or durably dead-lettered, in any order.
    """

    name: str = "source"

    assignments: AssignmentListener | None = None
    """Set by the engine: a partitioned source tells it of the partitions it takes and loses
    (or gives back)."""

    files_by_key: bool = False
    """Whether the input files records under a key beside the change (a column, a partition's
    stream): the engine then asks :meth:`misfiled` about every valid change."""
    replay: ReplayListener | None = None
    """Set by the engine: told of replay ranges (through :class:`ReplayRanges`) by the sources
    that know what may have been read before a crash."""
    backlog: bool = False
    """Whether more records are readable now, without waiting, than the last ``read`` handed
    out (it filled its chunk or page): the engine then reads ahead before it sends, so that
    an ID's later changes in the backlog merge into its request (False: do not know)."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect, position at the first record not yet acknowledged."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def start(self, task_group: TaskGroup) -> None:  # noqa: B027 - optional hook
        """Start the input's background work (lease keepers, listeners) in the engine's task
        group, after ``open``: a failure there ends the run with it, and nothing of it is left
        running after the run."""

    def shared_rate(self) -> SharedRate | None:
        """The account's rate schedule in the input's store, which replicas reading this
        input share (Redis, PostgreSQL); None: this replica keeps its own."""
        return None

    @abc.abstractmethod
    async def read(self) -> Sequence[Record] | HeldRecords | None:
        """The next records, waiting for some; None at the end of a finite input. A partitioned
        input returns :class:`HeldRecords`."""

    def current(self, partition: int, generation: int) -> bool:
        """Whether records read under this holding may still be taken in (a partitioned
        input: the holding has not ended since)."""
        return True

    def dropped(self, held: Held) -> None:  # noqa: B027 - optional hook
        """The engine dropped these records, not current any more: they are never
        acknowledged (the partition's next holder reads them again)."""

    @abc.abstractmethod
    async def ack(self, tokens: Sequence[Hashable]) -> None:
        """These records are done with: applied or dead-lettered."""

    acks_by_count: bool = False
    """Whether ``ack`` reads nothing of its tokens but how many there are (a file read without
    a checkpoint: a finite file is simply read again): the engine then builds no token lists,
    calls :meth:`ack_count` with their number, and keeps only the first and the last token
    of a merged change (for :meth:`describe`)."""

    tokens_numbered: bool = False
    """Whether the tokens are the records' numbers, increasing in the order read (a file's
    lines): the coalescer then takes a change's token as its arrival number instead of
    numbering it (an integer object fewer per waiting contact: 3.6 MB at 200,000 changes)."""

    async def ack_count(self, count: int) -> None:
        """``count`` records are done with (a source that ``acks_by_count``)."""
        raise NotImplementedError(f"{type(self).__name__} acknowledges by token")

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


S = TypeVar("S", bound=Source)


@asynccontextmanager
async def running(source: S) -> AsyncIterator[S]:
    """The source opened, its background work started in a task group of its own, then
    stopped, and the source closed: for tools and tests that read a source without an engine
    (the engine starts it in its own task group)."""
    async with source, anyio.create_task_group() as task_group:
        source.start(task_group)
        try:
            yield source
        finally:
            task_group.cancel_scope.cancel()


class ReplayRanges:
    """A source's replay ranges, told to its :class:`ReplayListener` at the right moments.

    Bookkeeping only: the source says when a range begins (before any of its records is handed
    out), and when its last records go out. A range begun before the engine attached (in
    ``open``) is announced by the first :meth:`sync`; the source calls :meth:`sync` in ``read``
    before it hands anything out, where every record of earlier reads has been taken in.
    """

    def __init__(self, source: Source) -> None:
        self._source = source
        self._unannounced: dict[str, Callable[[str], bool] | None] = {}
        self._open: set[str] = set()
        self._ending: set[str] = set()

    def begin(self, name: str, covers: Callable[[str], bool] | None = None) -> None:
        """A range starts: told now if the listener is attached, else at the next sync."""
        listener = self._source.replay
        if listener is None:
            self._unannounced[name] = covers
            return
        self._open.add(name)
        listener.replay_started(name, covers)

    def end_after_read(self, name: str) -> None:
        """The range's last records go out with the records this ``read`` returns: it ends at
        the next :meth:`sync`, once the engine has taken them in."""
        if name in self:
            self._ending.add(name)

    def end(self, name: str) -> None:
        """Every record of the range went out with earlier reads (or the range was given up,
        its waiting changes revoked): it ends now."""
        self._unannounced.pop(name, None)
        self._ending.discard(name)
        if name in self._open:
            self._open.discard(name)
            if self._source.replay is not None:
                self._source.replay.replay_done(name)

    def sync(self) -> None:
        """Announce the ranges begun before the listener attached; end those whose last
        records went out with an earlier read. Call it in ``read`` before handing anything out."""
        listener = self._source.replay
        if listener is None:
            return
        for name, covers in list(self._unannounced.items()):
            del self._unannounced[name]
            self._open.add(name)
            listener.replay_started(name, covers)
        for name in list(self._ending):
            self.end(name)

    def __contains__(self, name: object) -> bool:
        return name in self._open or name in self._unannounced

    def __bool__(self) -> bool:
        return bool(self._open or self._unannounced)
