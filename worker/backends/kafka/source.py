"""The ``kafka://`` input: a member of a Kafka consumer group, on aiokafka.

Per contact, order comes from Kafka: producers key each record by the contact ID, so that the
changes of one contact land in one partition, in order. A record whose key is not its change's
``ID`` is dead-lettered ``invalid`` (:meth:`KafkaSource.misfiled`), never sent.

Offsets are committed by hand, per partition, up to the contiguous prefix of records that were
applied or dead-lettered (:class:`~worker.backends.kafka.progress.PartitionProgress`), in
groups: every ``COMMIT_INTERVAL_S`` by a committer in the engine's task group, at once when a
partition's window is half used, before a rebalance and at the close.

Rebalances: aiokafka speaks Kafka's eager protocol, where every member is told "revoked" for all
its partitions before the group re-forms. Here that moment holds every waiting change (nothing
new is sent) until the requests in flight finished, then commits: whichever partitions go, none
of their requests is in flight when their next holder starts. Once the new assignment is known,
exactly the partitions taken away are revoked (their waiting changes forgotten, unacknowledged:
the next holder reads them from the committed offset); the kept ones go on where they were; the
new ones start from their committed offsets, as a replay range (DESIGN 9). A member the group
dropped meanwhile (unreachable past the session timeout) keeps nothing: another may have read
its partitions, so all of them start again from their committed offsets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Hashable, Sequence
from typing import Any, cast

import anyio
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from aiokafka.errors import (
    CommitFailedError,
    ConsumerStoppedError,
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
)
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata
from anyio.abc import TaskGroup

from worker.backends.base import (
    Held,
    HeldRecords,
    Outages,
    Record,
    ReplayRanges,
    Source,
    SourceError,
    SourceStatistics,
)
from worker.backends.kafka.progress import PartitionProgress
from worker.backends.kafka.rate import PartitionShareRate
from worker.backends.kafka.uri import KafkaAddress, parse_uri

log = structlog.get_logger("worker.backends.kafka")

KafkaToken = tuple[int, int, str | None]
"""A record's token: its partition, its offset and its key (the contact ID it is filed under)."""

COMMIT_INTERVAL_S = 0.2
"""How often the committer commits what was acknowledged since."""
SLOW_COMMIT_S = 5.0
"""A commit taking longer than this marks the input unavailable until one succeeds."""
QUIET_WAIT_S = 0.01
"""How often a revocation looks whether the requests in flight finished."""


class _Holding:
    """A partition this member reads, under one assignment of it (its generation)."""

    __slots__ = (
        "partition",
        "generation",
        "progress",
        "pending",
        "range",
        "range_end",
        "range_cap",
        "seen",
    )

    def __init__(self, partition: int, generation: int, window: int) -> None:
        self.partition = partition
        self.generation = generation
        self.progress = PartitionProgress(window)
        self.pending: list[ConsumerRecord[bytes, bytes]] = []
        """Fetched and not handed out yet (beyond the window, or waiting for the next read)."""
        self.range: str | None = None
        """The name of its replay range while that is not read to its end."""
        self.range_end: int | None = None
        """Where the replay range ends: ``window`` past the first offset read."""
        self.range_cap: int | None = None
        """The partition's end (its highwater) at the first fetch of it after it was taken:
        no replica read past it before this one took it, so the replay range ends there if
        that comes before :attr:`range_end`. Under a live feed the partition's end moves on as
        it is read, and the range would otherwise stay open (every contact of the partition
        held) until ``window`` records were read."""
        self.seen: set[str] = set()
        """The keys handed out while the replay range is open: the IDs it covers."""


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        await self._source._revoking()

    async def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        self._source._assigned({tp.partition for tp in assigned})


class KafkaSource(Source):
    """Records of a topic read through a consumer group; tokens are :data:`KafkaToken`."""

    name = "kafka"
    files_by_key = True  # the record's key is the contact ID it was filed (partitioned) under

    def __init__(
        self,
        address: KafkaAddress,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address
        self.topic = address.topic
        self.window = address.window
        self._clock = clock
        self._consumer: AIOKafkaConsumer | None = None
        self._holdings: dict[int, _Holding] = {}
        self._partitions_total = 1
        """The topic's partitions, as the group's metadata last said (the rate's share)."""
        self._generation = 0
        self._rebalancing = False
        self._dirty = False
        """Records were done since the last commit."""
        self._evicted = False
        """The group dropped this member before the rebalance under way."""
        self._ranges = ReplayRanges(self)
        self.outages = Outages()
        self.acked = 0
        self.commits = 0
        self.revoked_partitions = 0
        self.rebalances = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, check the topic exists, join the group (partitions come with the first
        read, once the group formed)."""
        address = self.address
        session_ms = round(address.session_timeout_s * 1000)
        consumer = AIOKafkaConsumer(
            group_id=address.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=address.batch,
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=max(100, session_ms // 3),
            rebalance_timeout_ms=(rebalance_ms := max(session_ms, 30_000)),
            # A JoinGroup may take the whole rebalance timeout to be answered.
            request_timeout_ms=max(40_000, rebalance_ms + 5_000),
            max_poll_interval_ms=24 * 3600 * 1000,  # the engine's backpressure is not a stall
            retry_backoff_ms=200,
            # Sticky: a rebalance moves as few partitions as it can (round robin for groups
            # with members that do not offer sticky).
            partition_assignment_strategy=(StickyPartitionAssignor, RoundRobinPartitionAssignor),
            **address.client_options(),
        )
        try:
            await consumer.start()
            topics = await consumer.topics()
        except KafkaError as exc:
            await consumer.stop()
            raise SourceError(f"cannot connect to kafka {address.display}: {exc}") from exc
        if self.topic not in topics:
            await consumer.stop()
            raise SourceError(
                f"kafka {address.display}: topic {self.topic!r} does not exist (create it with"
                " `contact-worker init --to URI`)"
            )
        consumer.subscribe([self.topic], listener=_Listener(self))
        self._consumer = consumer
        log.info("kafka source open", server=address.display, group=address.group)

    async def close(self) -> None:
        """Commit what is done, leave the group, disconnect."""
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        try:
            await self._commit(consumer)
        finally:
            await _stop(consumer)
        log.info(
            "kafka source closed",
            acked=self.acked,
            commits=self.commits,
            unacked=self.pending_in_run(),
        )

    # -- reading -----------------------------------------------------------------------------

    async def read(self) -> HeldRecords:
        """The next records of the held partitions, grouped by holding, waiting for some."""
        consumer = self._require()
        failures = 0
        while True:
            self._ranges.sync()
            out = self._hand_out()
            if out:
                return out
            try:
                fetched = await consumer.getmany(
                    timeout_ms=round(self.address.poll_s * 1000),
                    max_records=self.address.batch,
                )
            except ConsumerStoppedError:
                raise SourceError(f"kafka {self.address.display}: the consumer stopped") from None
            except KafkaError as exc:
                failures += 1
                self.outages.failed("read", str(exc) or type(exc).__name__)
                log.warning("kafka.read_failed", attempt=failures, error=repr(exc))
                await anyio.sleep(min(5.0, 0.1 * 2**failures))
                continue
            if failures:
                failures = 0
                self.outages.recovered("read")
            for tp, records in fetched.items():
                holding = self._holdings.get(tp.partition)
                if holding is not None and not self._rebalancing:
                    holding.pending += records
                    if holding.range is not None and holding.range_cap is None and records:
                        # Fetched since the partition was taken: its end then is no earlier.
                        highwater = consumer.highwater(tp)
                        if highwater is not None:
                            holding.range_cap = max(highwater, records[-1].offset + 1)
            await self._end_caught_up(consumer)

    def _hand_out(self) -> HeldRecords:
        """The pending records each holding has room for (its window), as HeldRecords."""
        out = HeldRecords()
        if self._rebalancing:
            return out
        for holding in self._holdings.values():
            pending = holding.pending
            if not pending:
                continue
            progress = holding.progress
            taken: list[Record] = []
            seen = holding.seen if holding.range is not None else None
            count = 0
            for record in pending:
                offset = record.offset
                if not progress.room(offset):
                    break
                raw_key = record.key
                key = None if raw_key is None else raw_key.decode("utf-8", "replace")
                progress.handed(offset, key)
                if seen is not None and key is not None:
                    seen.add(key)
                value = record.value
                taken.append(((holding.partition, offset, key), b"" if value is None else value))
                count += 1
            if not count:
                continue
            del pending[:count]
            if holding.range is not None and progress.next is not None:
                if holding.range_end is None:
                    holding.range_end = taken[0][0][1] + self.window  # type: ignore[index]
                cap = holding.range_cap
                if progress.next >= holding.range_end or (cap is not None and progress.next >= cap):
                    self._end_range(holding, after_read=True)
            out.append(Held(holding.partition, holding.generation, taken))
        return out

    async def _end_caught_up(self, consumer: AIOKafkaConsumer) -> None:
        """End the replay range of every holding read up to the partition's end."""
        for holding in list(self._holdings.values()):
            if holding.range is None:
                continue
            if holding.pending:  # a live feed: the range may end before the partition does
                done, cap = holding.progress.next, holding.range_cap
                if done is not None and cap is not None and done >= cap:
                    self._end_range(holding, after_read=False)  # sent with earlier reads
                continue
            tp = TopicPartition(self.topic, holding.partition)
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            position = holding.progress.next
            if position is None:
                try:
                    position = await consumer.position(tp)
                except (KafkaError, IllegalStateError):
                    continue
            if position >= highwater and holding.partition in self._holdings:
                self._end_range(holding, after_read=False)

    def _end_range(self, holding: _Holding, *, after_read: bool) -> None:
        name, holding.range = holding.range, None
        holding.seen = set()
        if name is None:
            return
        if after_read:
            self._ranges.end_after_read(name)
        else:
            self._ranges.end(name)

    # -- rebalancing (called by aiokafka's coordinator) ---------------------------------------

    async def _revoking(self) -> None:
        """Before the group re-forms: hold every waiting change, let the requests in flight
        finish (at most the rebalance timeout), commit what is done."""
        self._rebalancing = True
        self.rebalances += 1
        consumer = self._consumer
        if not self._holdings or consumer is None:
            return
        self._ranges.begin("kafka:rebalance", None)
        self._ranges.sync()
        listener = self.assignments
        deadline = self._clock() + max(self.address.session_timeout_s, 30.0) * 0.8
        # Polled: the engine's requests end on their own schedule, nothing here to wait on.
        while listener is not None and listener.ids_in_flight():  # noqa: ASYNC110
            if self._clock() >= deadline:
                break
            await anyio.sleep(QUIET_WAIT_S)
        # Dropped from the group (unreachable past the session): another member may have read
        # these partitions meanwhile, so none of them is kept as it was.
        self._evicted = getattr(consumer._coordinator, "generation", 0) == -1
        if listener is not None and listener.ids_in_flight():
            log.warning(
                "kafka.revoke_in_flight",
                detail="requests still in flight when the group re-formed: the next holder of"
                " their partitions may send a contact's change before they finish",
                in_flight=listener.ids_in_flight(),
            )
        await self._commit(consumer)

    def shared_rate(self) -> PartitionShareRate:
        """The account's rate, split by partition share (:mod:`worker.backends.kafka.rate`)."""
        return PartitionShareRate(self._rate_share)

    def _rate_share(self) -> float:
        total = max(1, self._partitions_total)
        return max(1, len(self._holdings)) / total

    def _assigned(self, partitions: set[int]) -> None:
        """The group formed: revoke exactly the partitions taken away, go on with the kept
        ones where they were, start the new ones from their committed offsets."""
        consumer = self._consumer
        if consumer is not None:
            known = consumer.partitions_for_topic(self.topic)
            if known:
                self._partitions_total = len(known)
        self._partitions_total = max(self._partitions_total, len(partitions))
        gone = set(self._holdings) - partitions
        if self._evicted:
            gone = set(self._holdings)
            self._evicted = False
        for p in sorted(gone):
            self._lose(p, "kafka.partition_revoked")
        for p in sorted(partitions & set(self._holdings)):
            holding = self._holdings[p]
            holding.pending = []
            if holding.progress.next is not None and consumer is not None:
                consumer.seek(TopicPartition(self.topic, p), holding.progress.next)
        new = sorted(partitions - set(self._holdings))
        for p in new:
            self._generation += 1
            holding = _Holding(p, self._generation, self.window)
            holding.range = f"kafka:{self.topic}/{p}#{self._generation}"
            seen = holding.seen
            self._ranges.begin(holding.range, lambda key, s=seen: key in s)  # type: ignore[misc]
            self._holdings[p] = holding
        if new and self.assignments is not None:
            self.assignments.assigned(new)
        self._rebalancing = False
        self._ranges.end("kafka:rebalance")
        log.info(
            "kafka.assigned",
            partitions=sorted(partitions),
            new=new,
            group=self.address.group,
        )

    def _lose(self, p: int, event: str) -> None:
        holding = self._holdings.pop(p)
        keys = holding.progress.keys()
        forgotten = 0
        if self.assignments is not None and keys:
            forgotten = self.assignments.revoked([p], keys.__contains__)
        if holding.range is not None:
            self._ranges.end(holding.range)
        self.revoked_partitions += 1
        log.info(event, partition=p, unacked=holding.progress.unacked, forgotten=forgotten)

    def current(self, partition: int, generation: int) -> bool:
        """Whether the holding records were read under is still read."""
        holding = self._holdings.get(partition)
        return holding is not None and holding.generation == generation

    # -- acknowledging -----------------------------------------------------------------------

    def start(self, task_group: TaskGroup) -> None:
        """Start the committer in the engine's task group."""
        task_group.start_soon(self._commit_loop, name=f"{self.name} commits")

    async def ack(self, tokens: Sequence[Hashable]) -> None:
        """Mark these records done; the committer commits them within ``COMMIT_INTERVAL_S``,
        or this ack at once where a partition's window is half used up."""
        holdings = self._holdings
        pressed = False
        half = self.window // 2
        for p, offset, _ in cast(Sequence[KafkaToken], tokens):
            holding = holdings.get(p)
            if holding is not None and holding.progress.done(offset):
                self.acked += 1
                progress = holding.progress
                if progress.next is not None and progress.committed is not None:
                    pressed = pressed or progress.next - progress.committed >= half
        self._dirty = True
        consumer = self._consumer
        if pressed and consumer is not None and not self._rebalancing:
            await self._commit(consumer)

    async def _commit_loop(self) -> None:
        """Commit what is done, in groups: every ``COMMIT_INTERVAL_S`` while acks come."""
        while True:
            await anyio.sleep(COMMIT_INTERVAL_S)
            consumer = self._consumer
            if self._dirty and consumer is not None and not self._rebalancing:
                await self._commit(consumer)

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        """Commit every held partition's commit point past its last commit, in one request."""
        offsets: dict[TopicPartition, Any] = {}
        points: dict[int, int] = {}
        for p, holding in self._holdings.items():
            point = holding.progress.to_commit()
            if point is not None:
                offsets[TopicPartition(self.topic, p)] = OffsetAndMetadata(point, "")
                points[p] = point
        self._dirty = False
        if not offsets:
            return
        try:
            async with anyio.create_task_group() as watch:
                # aiokafka waits for the group coordinator without limit: say meanwhile that
                # the input is out (the engine's acknowledgements wait with the commit).
                watch.start_soon(self._slow_commit)
                await consumer.commit(offsets)
                watch.cancel_scope.cancel()
        except (CommitFailedError, IllegalStateError) as exc:
            # The group re-formed meanwhile: the next round (or the next holder) commits.
            log.info("kafka.commit_skipped", error=str(exc))
            self._dirty = True
            return
        except KafkaError as exc:
            self._dirty = True
            self.outages.failed("commit", str(exc) or type(exc).__name__)
            log.warning("kafka.commit_failed", error=repr(exc))
            return
        self.outages.recovered("commit")
        self.commits += 1
        for p, point in points.items():
            kept = self._holdings.get(p)
            if kept is not None:
                kept.progress.committed = point

    async def _slow_commit(self) -> None:
        await anyio.sleep(SLOW_COMMIT_S)
        self.outages.failed("commit", "waiting for the group coordinator (brokers unreachable?)")
        log.warning("kafka.commit_waiting", server=self.address.display)

    # -- helpers -----------------------------------------------------------------------------

    def misfiled(self, token: Hashable, key: str) -> str | None:
        """Why a change is not filed under its own ID (the record's key)."""
        p, offset, record_key = cast(KafkaToken, token)
        if record_key == key:
            return None
        filed = "no key" if record_key is None else f"the key {record_key!r}"
        return (
            f"ID {key!r} came in a record with {filed} ({self.topic}/{p}@{offset}): producers"
            " must key each record by its change's ID, or a contact's changes lose their"
            " order across partitions; not sent"
        )

    def describe(self, tokens: Sequence[Hashable]) -> str:
        """``kafka:TOPIC/P@OFFSET``, several joined by commas."""
        topic = self.topic
        return ",".join(
            f"kafka:{topic}/{p}@{offset}" for p, offset, _ in cast(Sequence[KafkaToken], tokens)
        )

    def pending_in_run(self) -> int:
        """Records handed out and not acknowledged yet."""
        return sum(h.progress.unacked for h in self._holdings.values())

    @property
    def held(self) -> list[int]:
        """The partitions this member reads now."""
        return sorted(self._holdings)

    def statistics(self) -> SourceStatistics:
        """Reachable or not (and why), records handed out and not acked, partitions held."""
        problem = self.outages.problem
        return SourceStatistics(
            available=not problem,
            problem=f"kafka {self.address.display}: {problem}" if problem else "",
            reconnects=self.outages.started,
            unacked=self.pending_in_run(),
            partitions_held=len(self._holdings),
        )

    def _require(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise SourceError(f"kafka {self.address.display}: not open")
        return self._consumer


async def _stop(consumer: AIOKafkaConsumer) -> None:
    """Stop the consumer. aiokafka lets the cancellation of a fetch it was retrying (brokers
    unreachable) escape from ``stop``: swallowed here unless this task is being cancelled."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.warning("kafka.stopped_mid_fetch", detail="a fetch was being retried at stop")


def from_uri(uri: str) -> KafkaSource:
    """The source a ``kafka://`` URI names (not opened yet); ConfigError if the URI is bad."""
    return KafkaSource(parse_uri(uri))


__all__ = ["KafkaSource", "KafkaToken", "from_uri", "KafkaConnectionError"]
