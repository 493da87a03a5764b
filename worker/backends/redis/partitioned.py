"""The partitioned ``redis://`` input (``partitions`` above 1): one stream per partition, each
read by one replica at a time under a lease."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from itertools import repeat
from typing import Any, cast

import anyio
import structlog
from anyio.abc import TaskGroup
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from worker.backends.ahead import ReadAhead, ReadAheadAbandoned
from worker.backends.base import (
    Held,
    HeldRecords,
    Record,
    SourceError,
    SourceStatistics,
)
from worker.backends.redis.client import (
    READ_LINGER_S,
    SMALL_READ,
    TRANSIENT_ERRORS,
    claim_all,
    ensure_group,
    is_nogroup,
    pending_elsewhere,
)
from worker.backends.redis.leases import (
    PartitionLeases,
    PartitionToken,
)
from worker.backends.redis.scripts import (
    DELETE_IDLE_CONSUMER,
    DELETED,
    HEARTBEAT,
    RELEASE_LEASE,
    RENEW_LEASE,
    START,
    Entry,
    Page,
    framed_pages,
    unframed,
)
from worker.core.backoff import RECONNECT_BACKOFF
from worker.core.partition import partition_mismatch

log = structlog.get_logger("worker.backends.redis")


AHEAD_LIMIT_S = 10.0
"""How long a read ahead may take. It is not shielded: cancelled with the run, what it had
brought stays pending here, and whoever takes the partition next claims it at once."""
READ_ERRORS: tuple[type[Exception], ...] = (*TRANSIENT_ERRORS, ReadAheadAbandoned)


class PartitionedRedisSource(PartitionLeases):
    """Changes from ``partitions`` streams ``<stream>:<p>``, each served by one replica at a time.

    A replica reads a partition only while it holds its lease, the key ``<stream>:<p>:lease``
    (value: the consumer name), taken with ``SET NX PX lease_ms`` and renewed every
    ``lease_ms / 3`` with a compare-and-pexpire script. Live replicas register in the sorted set
    ``<stream>:members`` (score: expiry, server time); each takes free partitions up to its fair
    share ``ceil(partitions / live)`` and gives back the ones above it once the requests it has
    in flight for them are done, so the load spreads when a replica joins. A lease that cannot
    be renewed (expired, taken over) stops the reading of its partition at once, and the
    engine forgets the changes of that partition that wait (``revoke``), unacknowledged.

    On taking a partition, the entries other consumers left pending are claimed first
    (``XAUTOCLAIM``, idle 0: the lease says their consumer is gone), then this consumer's own
    pending entries are re-read in stream order, and only then new ones: per contact the order
    holds across the move. Tokens are ``(partition, entry ID)``.

    A change whose ID belongs to another partition than its stream's is dead-lettered
    ``invalid`` (:meth:`misfiled`): the replica holding the right one may send the contact's
    other changes meanwhile.
    """

    files_by_key = True  # the stream a change was appended to is its partition

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, create the groups, take a first share of partitions (the keeper renews
        them once :meth:`start` ran)."""
        client = await self._connect(self.streams, self._block_ms / 1000 + 10.0)
        self._client = client
        self._renew_script = client.register_script(RENEW_LEASE)
        self._release_script = client.register_script(RELEASE_LEASE)
        self._heartbeat_script = client.register_script(HEARTBEAT)
        try:
            await self._keep(client)
        except (RedisError, OSError) as exc:
            await client.aclose()
            self._client = None
            raise SourceError(self._explain(exc)) from exc
        log.info(
            "redis partitioned source open",
            server=self.address.display,
            stream=self.address.stream,
            partitions=self.partitions,
            group=self.group,
            consumer=self.consumer,
            held=sorted(self._held),
        )

    def start(self, task_group: TaskGroup) -> None:
        """Start the lease keeper in the engine's task group."""
        self._task_group = task_group
        task_group.start_soon(self._keep_loop, name=f"{self.name} leases")

    def _wrong_type(self, exc: ResponseError) -> str:
        return f"a key of {self.address.stream!r} has the wrong type: {exc}"

    async def close(self) -> None:
        """Release every lease (the keeper stopped with the engine's task group), leave the
        member set, disconnect. What a read ahead brought and was never handed out is pending
        here: whoever takes the partition next claims it at once."""
        self._ahead = None  # ended with the task group, or left to fail on the closed client
        client, self._client = self._client, None
        if client is None:
            return
        try:
            for p in sorted(set(self._held) | set(self._releasing)):
                await self._release_script(
                    keys=[self._lease_key(p)], args=[self.consumer], client=client
                )
            await client.zrem(self.members_key, self.consumer)
            for stream in self.streams:
                await client.eval(DELETE_IDLE_CONSUMER, 1, stream, self.group, self.consumer)
        except (RedisError, OSError) as exc:
            log.info("leases left to expire", consumer=self.consumer, error=str(exc))
        finally:
            await client.aclose()
        self._held.clear()
        self._releasing.clear()
        self._log_closed(self.pending_in_run(), lost=self.lost, given_back=self.given_back)

    # -- reading -----------------------------------------------------------------------------

    async def read(self) -> HeldRecords:
        """The next records of the held partitions, waiting for some, grouped by holding.

        When a full read is handed out, the next read starts at once (its records join the
        buffer, where losing a partition finds them) while the engine takes them in.
        """
        failures = 0
        while True:
            self._replay_step()
            if self._buffer:
                out, self._buffer = self._buffer, []
                if self._scanned:
                    self._scanned.difference_update(token for token, _ in out)
                held = self._by_holding(out)
                ahead = self._ahead
                if ahead is not None and ahead.done() and ahead.error is None:
                    self._ahead = None  # its records are in the buffer already
                if self._full_read and self._ahead is None and self._task_group is not None:
                    self._ahead = ReadAhead(
                        self._task_group,
                        self._read_ahead,
                        limit_s=AHEAD_LIMIT_S,
                        name=f"{self.name} read ahead",
                    )
                self.backlog = self._full_read
                if held:
                    return held
                continue
            if self._small_read:
                self._small_read = False
                await anyio.sleep(READ_LINGER_S)
                continue
            try:
                ahead, self._ahead = self._ahead, None
                if ahead is not None:
                    await ahead.wait()  # its records are in the buffer
                else:
                    await self._read_ahead()
            except READ_ERRORS as exc:
                failures += 1
                for state in self._held.values():
                    state.claimed = False
                    state.scan_from = START
                await self._back_off("read", failures, exc)
                continue
            except ResponseError as exc:
                if not is_nogroup(exc):
                    raise SourceError(self._explain(exc)) from exc
                log.warning("consumer group missing: recreating it", group=self.group)
                for p, state in self._held.items():
                    await ensure_group(self._require_client(), self.streams[p], self.group)
                    state.claimed = False
                    state.scan_from = START
                await anyio.sleep(RECONNECT_BACKOFF.base_s)
                continue
            failures = 0
            self.outages.recovered("read")

    def _by_holding(self, records: list[Record]) -> HeldRecords:
        """Records of held partitions, grouped by the holding they are handed out under."""
        groups: dict[int, list[Record]] = {}
        for record in records:
            p = cast(PartitionToken, record[0])[0]
            group = groups.get(p)
            if group is None:
                groups[p] = group = []
            group.append(record)
        held = HeldRecords()
        for p, group in groups.items():
            generation = self._own.generation(p)
            if generation is None:  # not read any more: never handed out
                self._handed[p].difference_update(
                    cast(PartitionToken, token)[1] for token, _ in group
                )
                continue
            held.append(Held(p, generation, group))
        return held

    async def _read_ahead(self) -> None:
        """One read step; its records go to the buffer as soon as they are in."""
        records = await self._read_step(self._require_client())
        if not records:
            self._full_read = False
            return
        self.entries_read += len(records)
        self._small_read = len(records) < SMALL_READ
        self._full_read = len(records) >= self.count
        self._buffer += records

    def _replay_step(self) -> None:
        """Announce the ranges of partitions taken before the engine attached; end those of
        partitions whose pending entries were all re-read and handed out by earlier reads."""
        ranges = self._ranges
        if not ranges:
            return
        ranges.sync()
        buffered: set[int] | None = None
        for p, state in self._held.items():
            if not state.replaying or not state.claimed or state.scan_from is not None:
                continue
            if buffered is None:
                buffered = {token[0] for token in self._scanned}
            if p not in buffered:
                state.replaying = False
                ranges.end(self.streams[p])

    async def _read_step(self, client: Redis) -> list[Record]:
        self._expire()
        held = self._held
        if not held:
            self._wake.clear()
            with anyio.move_on_after(self._block_ms / 1000):
                await self._wake.wait()
            return []
        for p, state in list(held.items()):
            if not state.claimed:
                await self._claim(client, p)
                if p in held:
                    state.claimed = True
                    state.scan_from = START
        now = self._clock()
        if now >= self._next_check_at:
            self._next_check_at = now + self.lease_ms / 3000
            await self._check_orphans(client)
        scanning = {p: s.scan_from for p, s in held.items() if s.scan_from is not None}
        if scanning:
            self._reading = set(scanning)
            try:
                pages = await self._read_pages(client, scanning)
            finally:
                self._reading = set()
            done = set(scanning)
            records = await self._records(pages, scanning=True, done=done)
            for p in done:
                if p in held:
                    held[p].scan_from = None
            self._scanned.update(cast(PartitionToken, token) for token, _ in records)
            return records
        # A backlog is read through the script, whose reply is cheap to parse; only when there
        # is none does a plain XREADGROUP wait for the next entries (as RedisStreamSource).
        new: dict[int, bytes] = dict.fromkeys(sorted(held), b">")
        self._reading = set(new)
        try:
            pages = await self._read_pages(client, new)
            # Only partitions still held (a lease may have gone during the script's read).
            streams: dict[Any, Any] = {self.streams[p]: b">" for p in new if p in held}
            if not pages and streams:
                reply = await client.xreadgroup(
                    self.group, self.consumer, streams, count=self.count, block=self._block_ms
                )
                pages = self._unframed_pages(reply)
        finally:
            self._reading = set()
        return await self._records(pages, scanning=False, done=set())

    async def _read_pages(self, client: Redis, starts: dict[int, bytes]) -> list[tuple[int, Page]]:
        """XREADGROUP without blocking, through the script, over these partitions from these
        IDs (``>``: new entries): (partition, its entries) per partition that has some."""
        partitions = list(starts)
        reply = await self._read_script(
            keys=[self.streams[p] for p in partitions],
            args=[self.group, self.consumer, self.count, *starts.values()],
            client=client,
        )
        return [(partitions[i], page) for i, page in framed_pages(reply)]

    def _unframed_pages(self, reply: object) -> list[tuple[int, Page]]:
        """The entries of a plain XREADGROUP reply over several partitions, per partition."""
        index = {stream.encode(): p for p, stream in enumerate(self.streams)}
        return [
            (
                index[key if isinstance(key, bytes) else str(key).encode()],
                unframed(cast(list[Entry], entries)),
            )
            for key, entries in cast(list[Any], reply or [])
        ]

    async def _check_orphans(self, client: Redis) -> None:
        """Entries of a held partition pending at another consumer after the takeover: a
        consumer that lost the lease had a read on its way. Claim them and re-read."""
        for p, state in list(self._held.items()):
            if not state.claimed:
                continue
            if await pending_elsewhere(client, self.streams[p], self.group, self.consumer):
                log.warning(
                    "entries of a held partition are pending at another consumer (read just"
                    " before it lost the lease): claiming them; their order against entries"
                    " already handed out is not guaranteed",
                    partition=p,
                )
                state.claimed = False
                state.scan_from = START

    async def _claim(self, client: Redis, p: int) -> None:
        """Take over every entry pending in p at other consumers (the lease says they left)."""
        stream = self.streams[p]
        if not await pending_elsewhere(client, stream, self.group, self.consumer):
            return
        taken = len(await claim_all(client, stream, self.group, self.consumer, 0, self.count))
        self.claimed += taken
        log.info("claimed pending entries of a taken partition", partition=p, count=taken)

    async def _records(
        self, pages: list[tuple[int, Page]], *, scanning: bool, done: set[int]
    ) -> list[Record]:
        records: list[Record] = []
        vanished: dict[int, list[bytes]] = {}
        for p, page in pages:
            if p not in self._held:
                continue  # lost while the reply was on its way: the next holder reads them
            if scanning and page.ids:
                done.discard(p)
                self._held[p].scan_from = page.last_id
            handed = self._handed[p]
            if not scanning and page.plain:
                # The usual page: new entries, each with its change. In bulk, no branches.
                handed.update(page.ids)
                tokens = zip(repeat(p), page.ids, strict=False)
                records += zip(tokens, page.values, strict=True)  # type: ignore[arg-type]
                continue
            for entry_id, value in zip(page.ids, page.values, strict=True):
                if scanning and entry_id in handed:
                    continue
                if type(value) is int:
                    if value == DELETED:
                        vanished.setdefault(p, []).append(entry_id)
                        continue
                    log.warning("entry without a change field", entry=entry_id.decode())
                    value = b""
                handed.add(entry_id)
                records.append(((p, entry_id), value))  # type: ignore[arg-type]
        for p, ids in vanished.items():
            log.warning(
                "pending entries were deleted from the stream before being processed",
                partition=p,
                count=len(ids),
            )
            await self._ack_partition(p, ids)
        if vanished:
            records = self._still_held(records)
        return records

    def _still_held(self, records: list[Record]) -> list[Record]:
        """These records less those of partitions lost or given back meanwhile (un-handed:
        the next holder reads them)."""
        held = self._held
        kept: list[Record] = []
        for record in records:
            p, entry_id = cast(PartitionToken, record[0])
            if p in held:
                kept.append(record)
                continue
            self._handed[p].discard(entry_id)
            if p in self._releasing:
                self._releasing[p] -= 1
        return kept

    # -- acknowledging -----------------------------------------------------------------------

    async def ack(self, tokens: Sequence[Hashable]) -> None:
        """XACK (and XDEL) these entries of all partitions in one round trip, retrying."""
        by_partition: dict[int, list[bytes]] = {}
        for p, entry_id in cast(Sequence[PartitionToken], tokens):
            ids = by_partition.get(p)
            if ids is None:
                by_partition[p] = ids = []
            ids.append(entry_id)
        await self._ack_partitions(by_partition)
        for p, ids in by_partition.items():
            self._handed[p].difference_update(ids)
            if p in self._releasing:
                self._releasing[p] -= len(ids)
            self.acked += len(ids)

    async def _ack_partition(self, p: int, ids: list[bytes]) -> None:
        await self._ack_partitions({p: ids})

    async def _ack_partitions(self, by_partition: dict[int, list[bytes]]) -> None:
        """XACK (and XDEL) the entries of several partitions in one round trip, retrying."""
        keys = [self.streams[p] for p in by_partition]
        args: list[bytes | str | int] = [self.group, int(self.address.delete_acked)]
        args += [b" ".join(ids) for ids in by_partition.values()]
        if not await self._acked(keys, args) and len(by_partition) > 1:
            # One stream lost its group: ack the others alone.
            for p, ids in by_partition.items():
                await self._ack_partitions({p: ids})

    # -- helpers -----------------------------------------------------------------------------

    def misfiled(self, token: Hashable, key: str) -> str | None:
        """Why a change does not belong in the partition whose stream it was appended to."""
        p = cast(PartitionToken, token)[0]
        return partition_mismatch(key, p, self.partitions, f"stream {self.streams[p]}")

    def describe(self, tokens: Sequence[Hashable]) -> str:
        """``redis:STREAM:P/ENTRY-ID``, several joined by commas."""
        parts = []
        for token in tokens:
            p, entry_id = cast(PartitionToken, token)
            parts.append(f"redis:{self.streams[p]}/{entry_id.decode()}")
        return ",".join(parts)

    def pending_in_run(self) -> int:
        """Entries handed out and not acknowledged yet."""
        return sum(len(h) for h in self._handed.values())

    def statistics(self) -> SourceStatistics:
        """Reachable or not (and why), reconnects, entries handed out and not acked,
        partitions held and partition leases lost."""
        problem = self.outages.problem
        return SourceStatistics(
            available=not problem,
            problem=f"redis {self.address.display}: {problem}" if problem else "",
            reconnects=self.reconnects,
            unacked=self.pending_in_run(),
            partitions_held=len(self._held),
            leases_lost={"partition": self.lost},
        )
