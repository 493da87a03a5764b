"""Partitioned Redis streams: leases, fair share, and scale-out without reordering."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, cast

import anyio
import orjson
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tests.cli.test_cli import BIN, Gateway, WorkerProcess, worker_env
from tests.engine.harness import expected_state
from tests.engine.test_engine import applied_in_order, stream
from tests.redis.test_redis_source import dead_letters, pending, run
from worker.backends.redis.partitioned import PartitionedRedisSource
from worker.backends.redis.producer import enqueue, init
from worker.backends.redis.sink import from_uri as sink_from_uri
from worker.backends.redis.stream import from_uri
from worker.core.partition import partition_of
from worker.engine import Engine
from worker.sim.gateway import SimConfig, Simulator

pytestmark = pytest.mark.anyio


def partitioned(uri: str, consumer: str) -> PartitionedRedisSource:
    source = from_uri(uri, consumer=consumer)
    assert isinstance(source, PartitionedRedisSource)
    return source


class Revocations:
    """An assignment listener that records what was revoked (the contact IDs among
    ``probe`` that each revocation covered), forgetting nothing."""

    def __init__(self, probe: Collection[str] = ()) -> None:
        self.probe = probe
        self.calls: list[list[str]] = []
        self.assigned_partitions: list[int] = []

    def assigned(self, partitions: Collection[int]) -> None:
        self.assigned_partitions += partitions

    def revoked(self, partitions: Collection[int], covers: Callable[[str], bool]) -> int:
        self.calls.append([k for k in self.probe if covers(k)])
        return 0


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    with anyio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 - polling state changed by other tasks
            await anyio.sleep(0.02)


class TestProducer:
    async def test_enqueue_routes_by_crc32_of_the_id(self, redis_url: str, prefix: str) -> None:
        """Each line goes to partition_of(str(ID)); lines without an ID go to partition 0;
        init creates the group on every partition stream."""
        uri = f"{redis_url}?stream={prefix}&partitions=4"
        await init(uri)
        changes = [{"ID": i if i % 2 else str(i), "lastname": "x"} for i in range(1, 41)]
        lines = [orjson.dumps(c) for c in changes] + [b"{oops", b'["no id"]']
        assert 42 == await enqueue(uri, lines)
        client = Redis.from_url(redis_url)
        try:
            seen: list[Any] = []
            for p in range(4):
                stream = f"{prefix}:{p}"
                groups = await client.xinfo_groups(stream)
                assert [b"contact-worker"] == [g["name"] for g in groups]
                entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(stream))
                for _, fields in entries:
                    line = fields[b"change"]
                    if line.startswith(b'{"ID"'):
                        key = orjson.loads(line)["ID"]
                        assert p == partition_of(str(key), 4)
                        seen.append(key)
                    else:
                        assert 0 == p, line
            assert sorted(map(str, seen)) == sorted(str(c["ID"]) for c in changes)
        finally:
            await client.aclose()


class TestMisfiledEntries:
    async def test_change_in_another_partitions_stream_is_dead_lettered_and_acked(
        self, redis_url: str, prefix: str
    ) -> None:
        """A change appended to a stream other than its ID's partition is dead-lettered
        ``invalid`` naming both partitions, never sent, and acknowledged; the rest applied."""
        uri = f"{redis_url}?stream={prefix}&partitions=4&lease_s=1&poll_s=0.1"
        await init(uri)
        right = partition_of("100013", 4)
        wrong = (right + 1) % 4
        client = Redis.from_url(redis_url)
        try:
            await client.xadd(f"{prefix}:{wrong}", {"change": b'{"ID": 100013, "lastname": "x"}'})
        finally:
            await client.aclose()
        good = [{"ID": i, "lastname": str(i)} for i in range(1, 9)]
        await enqueue(uri, [orjson.dumps(c) for c in [*good, {"ID": "100013", "extra1": "y"}]])
        sim = Simulator(SimConfig(known_count=200_000))

        async def scenario(engine: Engine) -> None:
            await wait_until(lambda: engine.stats.acked >= 10)

        await run(from_uri(uri, consumer="c"), sink_from_uri(uri), sim, scenario)

        assert expected_state([*good, {"ID": "100013", "extra1": "y"}]) == sim.contacts
        letters = await dead_letters(redis_url, f"{prefix}:dead")
        assert [("invalid", 100013)] == [(d["reason"], d["change"]["ID"]) for d in letters]
        assert f"partition {right} of 4" in letters[0]["detail"]
        assert f"stream {prefix}:{wrong} (partition {wrong})" in letters[0]["detail"]
        assert letters[0]["source"].startswith(f"redis:{prefix}:{wrong}/")
        for p in range(4):
            assert 0 == await pending(redis_url, f"{prefix}:{p}")


class TestInTheEnginesTaskGroup:
    async def test_the_lease_keeper_runs_in_the_engine_and_stops_with_it(
        self, redis_url: str, prefix: str
    ) -> None:
        """The lease keeper is started by the engine, in its task group: while the run goes
        on it renews the leases; once the run is over (before the source is closed) nothing
        of the source is left running."""
        uri = f"{redis_url}?stream={prefix}&partitions=2&lease_ms=300&block_ms=50"
        await init(uri)
        changes = [{"ID": i, "lastname": str(i)} for i in range(1, 21)]
        await enqueue(uri, [orjson.dumps(c) for c in changes])
        source = partitioned(uri, "c")
        left_running: list[str] = []
        close = source.close

        async def closing() -> None:
            left_running.extend(
                name
                for task in asyncio.all_tasks()
                if not task.done()
                and "_keep" in (name := getattr(task.get_coro(), "__qualname__", ""))
            )
            await close()

        source.close = closing  # type: ignore[method-assign]
        sim = Simulator(SimConfig(known_count=200_000))

        async def scenario(engine: Engine) -> None:
            await wait_until(lambda: engine.stats.acked >= 20)
            await anyio.sleep(1.0)  # a few lease lengths: renewed by the keeper, not lost
            assert [0, 1] == source.held
            assert 0 == source.lost

        await run(source, sink_from_uri(uri), sim, scenario)
        assert expected_state(changes) == sim.contacts
        assert [] == left_running


class TestLeases:
    async def test_two_sources_split_four_partitions(self, redis_url: str, prefix: str) -> None:
        """The first source takes all four; once a second joins, it gives two back and the
        second takes them: 2/2, every lease key naming its holder."""
        uri = f"{redis_url}?stream={prefix}&partitions=4&lease_s=0.6&poll_s=0.1"
        a = partitioned(uri, "a")
        b = partitioned(uri, "b")
        async with anyio.create_task_group() as tg:
            await a.open()
            a.start(tg)
            try:
                assert [0, 1, 2, 3] == a.held
                await b.open()
                b.start(tg)
                try:
                    await wait_until(lambda: len(a.held) == 2 and len(b.held) == 2)
                    assert not set(a.held) & set(b.held)
                    client = Redis.from_url(redis_url)
                    try:
                        for p in range(4):
                            holder = await client.get(f"{prefix}:{p}:lease")
                            assert holder == (b"a" if p in a.held else b"b")
                        assert 2 == await client.zcard(f"{prefix}:members")
                    finally:
                        await client.aclose()
                finally:
                    await b.close()
                # b left (its leases released): a takes everything back.
                await wait_until(lambda: len(a.held) == 4)
            finally:
                await a.close()

    @pytest.mark.slow
    async def test_give_back_waits_for_requests_in_flight(
        self, redis_url: str, prefix: str
    ) -> None:
        """Above its fair share, a source stops reading a partition and revokes its waiting
        changes, but keeps the lease until what it has in flight there is acknowledged: the
        next holder never overtakes a request still on its way."""
        uri = f"{redis_url}?stream={prefix}&partitions=2&lease_s=0.6&poll_s=0.1"
        await init(uri)
        a = partitioned(uri, "a")
        b = partitioned(uri, "b")
        revoked = Revocations()  # nothing waited: the one change read is in flight
        a.assignments = revoked
        key = next(k for k in map(str, range(1, 100)) if partition_of(k, 2) == 1)
        async with anyio.create_task_group() as tg:
            await a.open()
            a.start(tg)
            try:
                await enqueue(uri, [orjson.dumps({"ID": key, "lastname": "a"})])
                records = (await a.read()).flat()
                assert [(1, key)] == [(r[0][0], orjson.loads(r[1])["ID"]) for r in records]  # type: ignore[index]
                await b.open()
                b.start(tg)
                try:
                    await wait_until(lambda: a.held == [0] and bool(revoked.calls))
                    await anyio.sleep(1.0)  # a few renewal rounds: a still holds the lease
                    assert [] == b.held
                    await a.ack([records[0][0]])
                    with anyio.move_on_after(0.3):
                        await a.read()  # the engine's next read: nothing of p1 is on its way
                    await wait_until(lambda: b.held == [1])
                    with anyio.move_on_after(0.5):
                        again = await b.read()
                        pytest.fail(f"the acknowledged change was read again: {again}")
                finally:
                    await b.close()
            finally:
                await a.close()

    @pytest.mark.slow
    async def test_records_dropped_as_stale_let_a_given_back_partition_go(
        self, redis_url: str, prefix: str
    ) -> None:
        """Records handed out under a holding that was then given back are not current any
        more; once the engine says it dropped them (never sent), nothing of the partition is in
        flight: its lease is released and the next holder reads them, claimed at once."""
        uri = f"{redis_url}?stream={prefix}&partitions=2&lease_ms=600&block_ms=100"
        await init(uri)
        a = partitioned(uri, "a")
        b = partitioned(uri, "b")
        a.assignments = Revocations()  # nothing was taken in: nothing to forget
        keys = [k for k in map(str, range(1, 200)) if partition_of(k, 2) == 1][:10]
        async with anyio.create_task_group() as tg:
            await a.open()
            a.start(tg)
            try:
                await enqueue(uri, [orjson.dumps({"ID": k, "lastname": "a"}) for k in keys])
                [held] = await a.read()
                assert (1, 10) == (held.partition, len(held.records))
                assert a.current(held.partition, held.generation)
                await b.open()
                b.start(tg)
                try:
                    await wait_until(lambda: a.held == [0])
                    assert not a.current(held.partition, held.generation)
                    await anyio.sleep(1.0)  # a few rounds: the 10 records are in flight
                    assert [] == b.held
                    a.dropped(held)  # what the engine does with records not current
                    await wait_until(lambda: b.held == [1])
                    got: list[Any] = []
                    with anyio.fail_after(5):
                        while len(got) < 10:
                            got += (await b.read()).flat()
                    assert keys == [orjson.loads(value)["ID"] for _, value in got]
                    await b.ack([token for token, _ in got])
                finally:
                    await b.close()
            finally:
                await a.close()

    async def test_stolen_lease_revokes_and_stops_reading(
        self, redis_url: str, prefix: str
    ) -> None:
        """A lease taken over by another consumer: at the next renewal the source revokes the
        partition's waiting changes and reads it no more; the thief's entries stay with it."""
        uri = f"{redis_url}?stream={prefix}&partitions=2&lease_s=0.6&poll_s=0.1"
        await init(uri)
        source = partitioned(uri, "a")
        revocations = Revocations(("1", "2", "3", "4", "5", "6"))
        source.assignments = revocations
        revoked = revocations.calls
        p0 = [k for k in map(str, range(1, 100)) if partition_of(k, 2) == 0]
        async with anyio.create_task_group() as tg:
            await source.open()
            source.start(tg)
            client = Redis.from_url(redis_url)
            try:
                assert [0, 1] == source.held
                await enqueue(uri, [orjson.dumps({"ID": p0[0], "lastname": "a"})])
                records = (await source.read()).flat()
                assert [(0, records[0][0][1])] == [r[0] for r in records]  # type: ignore[index]
                await client.set(f"{prefix}:0:lease", "thief", px=60_000)
                await wait_until(lambda: source.held == [1])
                assert revoked and all(partition_of(k, 2) == 0 for k in revoked[0])
                await enqueue(uri, [orjson.dumps({"ID": p0[1], "lastname": "b"})])
                with anyio.move_on_after(0.5):
                    again = await source.read()
                    pytest.fail(f"read a partition it lost: {again}")
                assert b"thief" == await client.get(f"{prefix}:0:lease")
                pending = await client.xpending(f"{prefix}:0", "contact-worker")
                assert 1 == pending["pending"]  # the first entry, never acked: the next holder's
                await client.delete(f"{prefix}:0:lease")
                # The lease is free again: taken back, the unacked entry first, then the new one.
                records = (await source.read()).flat()
                if len(records) < 2:
                    records += (await source.read()).flat()
                assert 2 == len(records)
                assert [p0[0], p0[1]] == [orjson.loads(r[1])["ID"] for r in records]
                await source.ack([r[0] for r in records])
            finally:
                await source.close()
                await client.aclose()
            assert 1 <= source.lost

    async def test_a_page_read_ahead_goes_with_a_lost_partition(
        self, redis_url: str, prefix: str
    ) -> None:
        """After a full read the next one is read ahead into the buffer; losing the partition
        drops it there, so nothing read ahead of a lost partition is ever handed out."""
        uri = f"{redis_url}?stream={prefix}&partitions=2&lease_s=0.6&poll_s=0.1&batch=10"
        await init(uri)
        source = partitioned(uri, "a")
        source.assignments = Revocations()
        p0 = [k for k in map(str, range(1, 1000)) if partition_of(k, 2) == 0][:40]
        await enqueue(uri, [orjson.dumps({"ID": k}) for k in p0])
        async with anyio.create_task_group() as tg:
            await source.open()
            source.start(tg)
            client = Redis.from_url(redis_url)
            try:
                first = (await source.read()).flat()
                assert p0[:10] == [orjson.loads(value)["ID"] for _, value in first]
                await wait_until(lambda: source._ahead is not None and source._ahead.done())
                assert 10 == len(source._buffer)  # the next page, on its way before it was asked
                second = (await source.read()).flat()
                assert p0[10:20] == [orjson.loads(value)["ID"] for _, value in second]
                # Handing out a page read ahead starts the next read ahead in its turn.
                await wait_until(lambda: len(source._buffer) == 10)
                await client.set(f"{prefix}:0:lease", "thief", px=60_000)
                await wait_until(lambda: source.held == [1])
                assert [] == source._buffer
                with anyio.move_on_after(0.5):
                    again = await source.read()
                    pytest.fail(f"handed out records of a partition it lost: {again}")
            finally:
                await source.close()
                await client.aclose()

    async def test_deleted_lease_key_is_lost_or_retaken(self, redis_url: str, prefix: str) -> None:
        """Deleting a lease key under a holder: its renewal fails (compare-and-pexpire finds
        nothing), so it revokes; no two consumers ever read one partition."""
        uri = f"{redis_url}?stream={prefix}&partitions=3&lease_s=0.6&poll_s=0.1"
        source = partitioned(uri, "a")
        revocations = Revocations()
        source.assignments = revocations
        calls = revocations.calls
        async with anyio.create_task_group() as tg:
            await source.open()
            source.start(tg)
            client = Redis.from_url(redis_url)
            try:
                await client.delete(f"{prefix}:1:lease")
                await wait_until(lambda: bool(calls))
                assert 1 <= source.lost
                # Free again and within its fair share: it takes it back with a fresh lease.
                await wait_until(lambda: source.held == [0, 1, 2])
                assert b"a" == await client.get(f"{prefix}:1:lease")
            finally:
                await source.close()
                await client.aclose()
            client = Redis.from_url(redis_url)
            try:
                assert 0 == await client.exists(*(f"{prefix}:{p}:lease" for p in range(3)))
            finally:
                await client.aclose()


# -- scale-out at the user's level --------------------------------------------------------------

REDIS = "redis://127.0.0.1:6379/0"


class Replica(WorkerProcess):
    """One `contact-worker run` process with a stable consumer name."""

    def __init__(self, uri: str, name: str, env: dict[str, str], log: Path) -> None:
        super().__init__(f"{uri}&consumer={name}", env, log)
        self.name = name


@pytest.fixture
def sync_redis() -> Iterator[SyncRedis]:
    client = SyncRedis.from_url(REDIS)
    try:
        client.ping()
    except RedisError:
        pytest.skip("no Redis on 127.0.0.1:6379 (.ci/run starts one)")
    yield client
    client.close()


@pytest.fixture
def sync_prefix(sync_redis: SyncRedis) -> Iterator[str]:
    """A key prefix of this test's own; every key under it is deleted afterwards."""
    name = f"test:{uuid.uuid4().hex}"
    yield name
    keys = list(sync_redis.scan_iter(match=f"{name}*", count=1000))
    if keys:
        sync_redis.delete(*keys)


def held_by(client: SyncRedis, prefix: str, partitions: int, name: bytes) -> list[int]:
    """The partitions whose lease this consumer holds."""
    return [p for p in range(partitions) if client.get(f"{prefix}:{p}:lease") == name]


@pytest.mark.slow
def test_scale_out_three_replicas_one_killed(
    tmp_path: Path, sync_redis: SyncRedis, sync_prefix: str
) -> None:
    """3 replicas on 6 partitions; one is kill -9ed mid-run and restarted, more changes come:
    every change is applied, per contact the sequence numbers never go back, nothing stays
    pending, and SIGTERM stops every replica with 0."""
    prefix = sync_prefix
    partitions = 6
    uri = f"{REDIS}?stream={prefix}&partitions={partitions}&lease_s=1.5&poll_s=0.2"
    gw = Gateway("--known-count", "300", "--latency", "uniform:30:90", "--record-history")
    replicas: list[Replica] = []
    try:
        init = subprocess.run(
            [BIN, "init", "--to", uri], capture_output=True, text=True, timeout=60
        )
        assert 0 == init.returncode, init.stderr
        changes = stream(4000, 300, seed=44)
        env = worker_env(gw, tmp_path, WORKER_BATCH_SIZE="20", WORKER_CONCURRENCY="4")
        del env["WORKER_DLQ"]
        replicas = [Replica(uri, f"r{i}", env, tmp_path / f"r{i}.log") for i in (1, 2, 3)]
        for replica in replicas:
            replica.start()

        def holders() -> set[Any]:
            return {sync_redis.get(f"{prefix}:{p}:lease") for p in range(partitions)}

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and holders() != {b"r1", b"r2", b"r3"}:
            time.sleep(0.05)
        assert {b"r1", b"r2", b"r3"} == holders()
        # Ten rounds of 400 changes, each an `enqueue` process: r2 is killed with work in
        # hand after the fourth, restarted after the sixth.
        for round_ in range(10):
            data = b"".join(
                json.dumps(c).encode() + b"\n" for c in changes[round_ * 400 : (round_ + 1) * 400]
            )
            producer = subprocess.Popen([BIN, "enqueue", "--to", uri], stdin=subprocess.PIPE)
            assert producer.stdin is not None
            producer.stdin.write(data)
            producer.stdin.close()
            if round_ == 3:
                mine = held_by(sync_redis, prefix, partitions, b"r2")
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not any(
                    sync_redis.xpending(f"{prefix}:{p}", "contact-worker")["pending"] for p in mine
                ):
                    time.sleep(0.005)
                assert time.monotonic() < deadline, "r2 never had entries pending"
                replicas[1].kill()  # with entries read and not acknowledged
            if round_ == 5:
                replicas[1].start()
            assert 0 == producer.wait(30)
        want = expected_state(changes)
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline and gw.get("/_sim/contacts") != want:
            time.sleep(0.2)
        if want != gw.get("/_sim/contacts"):
            state = {
                p: (
                    sync_redis.get(f"{prefix}:{p}:lease"),
                    sync_redis.xlen(f"{prefix}:{p}"),
                    sync_redis.xpending(f"{prefix}:{p}", "contact-worker"),
                )
                for p in range(partitions)
            }
            pytest.fail(f"not applied in time: {state}, {gw.get('/_sim/stats')}")
        codes = [replica.stop() for replica in replicas]
        logs = {p.name: p.read_text() for p in tmp_path.glob("r*.log")}
        assert [0, 0, 0] == codes, logs
        history = gw.get("/_sim/history")
        assert applied_in_order(history)
        for p in range(partitions):
            pending = sync_redis.xpending(f"{prefix}:{p}", "contact-worker")
            assert 0 == pending["pending"], (p, pending)
    finally:
        for replica in replicas:
            if replica.proc is not None and replica.proc.poll() is None:
                replica.proc.kill()
                replica.proc.wait(10)
        gw.stop()
