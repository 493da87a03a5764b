"""The ``redis://`` source and dead-letter stream, against a real Redis and the real engine."""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import orjson
import pytest
from redis.asyncio import Redis

from tests.engine.harness import expected_state, settings
from tests.redis.conftest import PrivateRedis
from worker.backends.base import Source, SourceError, records_of, running
from worker.backends.redis.producer import enqueue, init
from worker.backends.redis.scripts import framed_pages
from worker.backends.redis.sink import RedisStreamDeadLetters
from worker.backends.redis.sink import from_uri as sink_from_uri
from worker.backends.redis.stream import RedisStreamSource
from worker.backends.redis.stream import from_uri as source_from_uri
from worker.backends.redis.uri import parse_uri
from worker.config import Secret
from worker.deadletters.base import DeadLetterError
from worker.engine import Ending, Engine, EngineSettings, Result
from worker.errors import ConfigError
from worker.sender import Sender
from worker.sim.gateway import SimConfig, Simulator, serve

pytestmark = pytest.mark.anyio


def from_uri(uri: str, **kwargs: Any) -> RedisStreamSource:
    """The single-stream source of this URI."""
    source = source_from_uri(uri, **kwargs)
    assert isinstance(source, RedisStreamSource)
    return source


Scenario = Callable[[Engine], Awaitable[None]]


def sequenced(n: int, ids: int, seed: int, start: dict[int, int] | None = None) -> list[Any]:
    """n changes over IDs 1..ids, each with a per-ID sequence number in extra1 (continuing
    from ``start``, which is updated)."""
    rng = random.Random(seed)
    seq = start if start is not None else {}
    out: list[Any] = []
    for _ in range(n):
        i = rng.randint(1, ids)
        seq[i] = seq.get(i, 0) + 1
        out.append({"ID": i if rng.random() < 0.5 else str(i), "extra1": str(seq[i])})
    return out


def lines(changes: list[Any]) -> list[bytes]:
    """The JSON lines of these changes."""
    return [orjson.dumps(c) for c in changes]


def applied_in_order(history: dict[str, list[dict[str, Any]]]) -> bool:
    """Per ID, the sequence numbers the API applied never go backwards."""
    return all(
        (seqs := [int(o["extra1"]) for o in objs if "extra1" in o]) == sorted(seqs)
        for objs in history.values()
    )


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Poll until the predicate holds."""
    with anyio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 - polling counters of other tasks
            await anyio.sleep(0.005)


async def run(
    source: Source,
    sink: RedisStreamDeadLetters,
    sim: Simulator,
    scenario: Scenario,
    engine_settings: EngineSettings | None = None,
) -> tuple[Result, Engine]:
    """Run the engine on the source until the scenario returns, then shut it down."""
    es = engine_settings or settings()
    results: list[Result] = []
    async with serve(sim) as url:
        await source.open()
        await sink.open()
        try:
            async with Sender(
                url, "demo", Secret("demo-secret"), concurrency=es.concurrency, timeout_s=5.0
            ) as sender:
                engine = Engine(source, sink, sender, es)

                async def drive() -> None:
                    results.append(await engine.run())

                async with anyio.create_task_group() as tg:
                    tg.start_soon(drive)
                    await scenario(engine)
                    # The source never ends: shutdown must not wait for the blocked XREADGROUP.
                    with anyio.fail_after(10):
                        engine.shutdown()
                        await wait_until(lambda: bool(results))
        finally:
            await sink.close()
            await source.close()
    return results[0], engine


async def applied(engine: Engine, entries: int) -> None:
    """Wait until this many entries were acknowledged."""
    await wait_until(lambda: engine.stats.acked >= entries)


async def pending(url: str, stream: str, group: str = "contact-worker") -> int:
    """The group's pending-entry count (XPENDING)."""
    client = Redis.from_url(url)
    try:
        return int((await client.xpending(stream, group))["pending"])
    finally:
        await client.aclose()


async def dead_letters(url: str, stream: str) -> list[dict[str, Any]]:
    """The letters in a dead-letter stream, oldest first."""
    client = Redis.from_url(url)
    try:
        return [orjson.loads(f[b"letter"]) for _, f in await client.xrange(stream)]
    finally:
        await client.aclose()


class TestUri:
    def test_defaults(self) -> None:
        """Stream, group and the dead-letter stream have the documented defaults."""
        address = parse_uri("redis://127.0.0.1:6379/0")
        assert ("contacts:changes", "contact-worker") == (address.stream, address.group)
        assert "contacts:changes:dead" == address.dead_letter_stream
        assert (5000, 1000, 30_000, True) == (
            address.block_ms,
            address.count,
            address.claim_idle_ms,
            address.delete_acked,
        )

    def test_parameters_and_no_password_in_names(self) -> None:
        """Query parameters set the stream settings and are not sent to the server; the
        password never shows in the display name or the describe() text."""
        source = from_uri(
            "redis://:s3cret@db.example:6380/2?stream=crm:changes&group=g&batch=50"
            "&poll_s=0.1&claim_idle_s=0&consumer=pod-1&delete_acked=0"
        )
        address = source.address
        assert ("crm:changes", "g", "pod-1") == (source.stream, source.group, source.consumer)
        assert (50, 100, 0, False) == (
            address.count,
            address.block_ms,
            address.claim_idle_ms,
            address.delete_acked,
        )
        assert "db.example:6380/2" == address.display
        assert "redis://:s3cret@db.example:6380/2" == address.url
        assert "redis:crm:changes/1-0,2-5" == source.describe([b"1-0", b"2-5"])
        assert "s3cret" not in source.name

    @pytest.mark.parametrize(
        ("uri", "message"),
        [
            ("redis://h/0?batch=0", "batch must be at least 1"),
            ("redis://h/0?batch=x", "batch must be an integer"),
            ("redis://h/0?poll_s=x", "poll_s must be seconds, got 'x'"),
            ("redis://h/0?poll_s=0", "poll_s must be at least 0.001 s"),
            ("redis://h/0?claim_idle_s=nan", "claim_idle_s must be at least 0 s"),
            ("redis://h/0?block_ms=x", "block_ms must be a number"),
            ("redis://h/0?count=5&batch=6", "batch is given twice"),
            ("redis://h/0?stream=", "stream must not be empty"),
            ("redis://h/0?streem=a", "unknown parameter 'streem' \\(known: batch, "),
            ("redis://h/0?poll_ms=5", "unknown parameter 'poll_ms'"),
            ("redis://h/0?partitions=0", "partitions must be at least 1"),
            ("redis://h/0?partitions=2&lease_s=0.005", "lease_s must be at least 0.1 s"),
            ("http://h/0", "not a redis URI"),
        ],
    )
    def test_bad_uris_are_configuration_errors(self, uri: str, message: str) -> None:
        """A bad URI is a ConfigError (exit 2) that says what is wrong."""
        with pytest.raises(ConfigError, match=message):
            from_uri(uri)


class TestOpen:
    async def test_unreachable_server_is_a_source_error(self) -> None:
        """Nothing listening: open() fails with a SourceError naming the server."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        source = from_uri(f"redis://127.0.0.1:{port}/0")
        with pytest.raises(SourceError, match=f"cannot connect to redis 127.0.0.1:{port}/0"):
            await source.open()
        sink = sink_from_uri(f"redis://127.0.0.1:{port}/0")
        with pytest.raises(DeadLetterError, match="cannot connect"):
            await sink.open()

    async def test_key_of_another_type(self, redis_url: str, prefix: str) -> None:
        """A stream key that holds a string: both source and sink refuse to open."""
        client = Redis.from_url(redis_url)
        try:
            await client.set(f"{prefix}:s", "x")
            await client.set(f"{prefix}:s:dead", "x")
        finally:
            await client.aclose()
        with pytest.raises(SourceError, match="is not a stream"):
            await from_uri(f"{redis_url}?stream={prefix}:s").open()
        with pytest.raises(DeadLetterError, match="not a stream"):
            await sink_from_uri(f"{redis_url}?stream={prefix}:s").open()


class TestProducer:
    async def test_init_is_idempotent_and_enqueue_counts(self, redis_url: str, prefix: str) -> None:
        """init creates the group once; enqueue appends one entry per non-blank line, from a
        plain or an async iterable, with the line (without its ending) in the field change."""
        uri = f"{redis_url}?stream={prefix}:c&group=g"
        await init(uri)
        await init(uri)

        async def more() -> AsyncIterator[bytes]:
            for i in range(1500):
                yield b'{"ID": %d, "lastname": "x"}\r\n' % i

        assert 2 == await enqueue(uri, [b'{"ID": 1, "lastname": "a"}\n', b"\n", b"  ", b"bad"])
        assert 1500 == await enqueue(uri, more())
        client = Redis.from_url(redis_url)
        try:
            assert 1502 == await client.xlen(f"{prefix}:c")
            first = await client.xrange(f"{prefix}:c", count=2)
            assert [b'{"ID": 1, "lastname": "a"}', b"bad"] == [f[b"change"] for _, f in first]
            groups = await client.xinfo_groups(f"{prefix}:c")
            assert [b"g"] == [g["name"] for g in groups]
        finally:
            await client.aclose()


class TestSource:
    async def test_entries_another_consumer_leaves_pending_are_claimed_while_running(
        self, redis_url: str, prefix: str
    ) -> None:
        """Entries a second consumer took and never acked are claimed by the running source
        after claim_idle_ms and handed out once; its own unacked entries are not handed out
        again."""
        uri = f"{redis_url}?stream={prefix}:c&claim_idle_s=0.2&poll_s=0.05"
        source = from_uri(uri, consumer="mine")
        await source.open()
        client = Redis.from_url(redis_url)
        try:
            await enqueue(uri, [b'{"ID": %d, "lastname": "x"}' % i for i in range(5)])
            mine = [token for token, _ in await source.read()]
            await enqueue(uri, [b'{"ID": %d, "lastname": "y"}' % i for i in range(5, 8)])
            stolen = await client.xreadgroup("contact-worker", "other", {f"{prefix}:c": ">"})
            with anyio.fail_after(5):
                claimed = [token for token, _ in await source.read()]
            assert [entry_id for entry_id, _ in stolen[0][1]] == claimed
            assert (5, 3) == (len(mine), source.claimed)
            await source.ack(mine + claimed)
            assert 0 == await pending(redis_url, f"{prefix}:c")
        finally:
            await client.aclose()
            await source.close()


class TestEngine:
    async def test_round_trip_applied_acked_and_shut_down(
        self, redis_url: str, prefix: str
    ) -> None:
        """Changes enqueued (some invalid) run through the real engine: every valid change is
        applied in per-ID order, every entry is acked and deleted, the invalid ones are in the
        dead-letter stream, and shutdown() ends the run although the stream never ends."""
        changes = sequenced(1200, 80, seed=1)
        uri = f"{redis_url}?stream={prefix}:c&poll_s=30"
        await enqueue(uri, lines(changes[:600]) + [b'{"ID": 2, "lastname": '])
        await enqueue(uri, lines(changes[600:]))
        sim = Simulator(SimConfig(known_count=80, latency="exp:1", record_history=True))

        async def scenario(engine: Engine) -> None:
            await applied(engine, 1201)

        result, engine = await run(from_uri(uri), sink_from_uri(uri), sim, scenario)
        assert Ending.SHUTDOWN == result.ending
        assert expected_state(changes) == sim.contacts
        assert applied_in_order(sim.history)
        assert 0 == await pending(redis_url, f"{prefix}:c")
        client = Redis.from_url(redis_url)
        try:
            assert 0 == await client.xlen(f"{prefix}:c")
        finally:
            await client.aclose()
        letters = await dead_letters(redis_url, f"{prefix}:c:dead")
        assert [("invalid", '{"ID": 2, "lastname": ')] == [(d["reason"], d["raw"]) for d in letters]
        assert letters[0]["source"].startswith(f"redis:{prefix}:c/")
        client = Redis.from_url(redis_url)
        try:  # a consumer that holds nothing unregisters on close
            assert [] == await client.xinfo_consumers(f"{prefix}:c", "contact-worker")
        finally:
            await client.aclose()

    async def test_undecodable_entries_dead_lettered_invalid_and_acked(
        self, redis_url: str, prefix: str
    ) -> None:
        """An entry without a change field, one that is not UTF-8, bad JSON and an invalid
        change: each dead-lettered `invalid` with its entry ID as source, each acked."""
        uri = f"{redis_url}?stream={prefix}:c&group=g&dead_stream={prefix}:dlq"
        client = Redis.from_url(redis_url)
        try:
            ids = [
                await client.xadd(f"{prefix}:c", fields)
                for fields in (
                    {"change": b'{"ID": 1, "lastname": "Lee"}'},
                    {"other": b"x"},
                    {"change": b"\xff\xfe"},
                    {"change": b"{nope"},
                    {"change": b'{"ID": 3, "nickname": "x"}'},
                )
            ]
        finally:
            await client.aclose()
        sim = Simulator(SimConfig(known_count=10))

        async def scenario(engine: Engine) -> None:
            await applied(engine, 5)

        await run(from_uri(uri), sink_from_uri(uri), sim, scenario)
        assert {"1": {"lastname": "Lee"}} == sim.contacts
        letters = {d["source"]: d for d in await dead_letters(redis_url, f"{prefix}:dlq")}
        sources = [f"redis:{prefix}:c/{i.decode()}" for i in ids[1:]]
        assert set(sources) == set(letters)
        assert {"invalid"} == {d["reason"] for d in letters.values()}
        assert "" == letters[sources[0]]["raw"]
        assert "UTF-8" in letters[sources[1]]["detail"]
        assert "{nope" == letters[sources[2]]["raw"]
        assert "nickname" in letters[sources[3]]["detail"]
        assert 0 == await pending(redis_url, f"{prefix}:c", "g")

    async def test_acked_only_after_applied(self, redis_url: str, prefix: str) -> None:
        """While requests are held by the API's latency, their entries stay pending; once the
        API answered, they are acked."""
        uri = f"{redis_url}?stream={prefix}:c"
        await enqueue(uri, lines([{"ID": i, "lastname": "x"} for i in range(1, 31)]))
        sim = Simulator(SimConfig(known_count=30, latency="800"))
        seen: list[tuple[int, int, int]] = []

        async def scenario(engine: Engine) -> None:
            await wait_until(lambda: sim.stats.in_flight >= 3)
            seen.append(
                (await pending(redis_url, f"{prefix}:c"), engine.stats.acked, len(sim.contacts))
            )
            await applied(engine, 30)

        await run(
            from_uri(uri), sink_from_uri(uri), sim, scenario, settings(batch=10, linger_s=0.01)
        )
        assert [(30, 0, 0)] == seen
        assert 30 == len(sim.contacts)
        assert 0 == await pending(redis_url, f"{prefix}:c")

    async def test_pending_of_a_killed_consumer_claimed_before_newer_entries(
        self, redis_url: str, prefix: str
    ) -> None:
        """A consumer reads entries and dies without acking; newer entries arrive. The next
        consumer claims the dead one's entries once idle and applies them BEFORE the newer ones,
        so per-ID order holds at the API."""
        uri = f"{redis_url}?stream={prefix}:c&claim_idle_s=0.3"
        seq: dict[int, int] = {}
        old = sequenced(300, 40, seed=2, start=seq)
        new = sequenced(300, 40, seed=3, start=seq)
        await enqueue(uri, lines(old))
        dead = from_uri(uri, consumer="dead")
        await dead.open()
        taken: list[Any] = []
        while len(taken) < len(old):
            taken.extend(await dead.read())
        await dead.close()  # its connection gone; its pending entries stay in the group
        await enqueue(uri, lines(new))
        assert 300 == await pending(redis_url, f"{prefix}:c")
        sim = Simulator(SimConfig(known_count=40, record_history=True))
        heir = from_uri(uri, consumer="heir")

        async def scenario(engine: Engine) -> None:
            await applied(engine, 600)

        await run(heir, sink_from_uri(uri), sim, scenario)
        assert 300 == heir.claimed
        assert applied_in_order(sim.history)
        assert expected_state(old + new) == sim.contacts
        assert 0 == await pending(redis_url, f"{prefix}:c")

    async def test_redis_restart_mid_run(self, private_redis: PrivateRedis) -> None:
        """Redis is killed (SIGKILL) while the worker is busy and restarted from its AOF: the
        worker reconnects, re-reads its pending list without handing out again what is in
        flight, acks what it applied; nothing is lost and no older change is applied after a
        newer one."""
        uri = f"{private_redis.url}?stream=c&poll_s=0.2"
        seq: dict[int, int] = {}
        before = sequenced(2000, 600, seed=4, start=seq)
        after = sequenced(500, 600, seed=5, start=seq)
        await enqueue(uri, lines(before))
        # Slow enough that most entries are still pending when the worker reconnects.
        sim = Simulator(SimConfig(known_count=600, latency="20", record_history=True))
        source = from_uri(uri)

        async def scenario(engine: Engine) -> None:
            await applied(engine, 400)
            await private_redis.kill()
            await anyio.sleep(0.3)
            await private_redis.start()
            await enqueue(uri, lines(after))
            await applied(engine, 2500)

        await run(source, sink_from_uri(uri), sim, scenario, settings(batch=10, concurrency=2))
        assert source.reconnects >= 1
        # What was in flight across the restart was not handed to the engine a second time.
        assert 2500 == source.entries_read
        assert applied_in_order(sim.history)
        assert expected_state(before + after) == sim.contacts
        assert 0 == await pending(private_redis.url, "c")


@pytest.mark.parametrize("partitions", [1, 3])
async def test_stream_deleted_under_a_blocked_read(
    redis_url: str, prefix: str, partitions: int
) -> None:
    """Deleting the stream while a read waits on it (Redis ends the wait with UNBLOCKED) is
    not fatal: the group is recreated and what is written next is read."""
    uri = f"{redis_url}?stream={prefix}&poll_s=2&partitions={partitions}&lease_s=1"
    await init(uri)
    source = source_from_uri(uri, consumer="c1")
    await source.open()
    client = Redis.from_url(redis_url)
    got: list[Any] = []
    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:

                async def reader() -> None:
                    while not got:
                        got.extend(records_of(await source.read()))

                tg.start_soon(reader)
                await anyio.sleep(0.5)  # the reader waits in XREADGROUP ... BLOCK
                keys = [prefix] if partitions == 1 else [f"{prefix}:{p}" for p in range(partitions)]
                assert await client.delete(*keys) == partitions
                await anyio.sleep(0.3)
                await enqueue(uri, [b'{"ID": 1, "extra1": "a"}'])
        assert [value for _, value in got] == [b'{"ID": 1, "extra1": "a"}']
    finally:
        await client.aclose()
        await source.close()


@pytest.mark.parametrize("partitions", [1, 2])
async def test_entries_of_any_shape_are_read_whole(
    redis_url: str, prefix: str, partitions: int
) -> None:
    """A page is read in bulk when every entry has a one-line change; an entry whose change
    spans lines (another producer's pretty JSON) or that has no change field is still read
    whole, in stream order, on both paths."""
    uri = f"{redis_url}?stream={prefix}&poll_s=0.1&partitions={partitions}&lease_s=1"
    await init(uri)
    key = prefix if partitions == 1 else f"{prefix}:0"
    client = Redis.from_url(redis_url)
    plain = [b'{"ID": %d}' % i for i in range(5)]
    mixed = [b'{"ID": 7,\n "extra1": "a\\nb"}', b'{"ID": 8}', None, b"", b'{"ID": 9}\n']
    for value in plain + mixed:
        await client.xadd(key, {"change": value} if value is not None else {"other": "x"})
    source = source_from_uri(uri, consumer="c1")
    await source.open()
    try:
        got: list[bytes] = []
        with anyio.fail_after(20):
            while len(got) < len(plain) + len(mixed):
                records = records_of(await source.read())
                got += [value for _, value in records]
                await source.ack([token for token, _ in records])
        assert got == plain + [b"" if v is None else v for v in mixed]
    finally:
        await client.aclose()
        await source.close()


def test_framed_pages_split_plain_and_sized_replies() -> None:
    """The read script's two reply shapes, one stream or several."""
    plain = framed_pages([b"1-0 2-0 3-0", b"", b"a\nb\nc", b"1 2 0 1"])
    assert [(p, page.ids, page.values, page.plain) for p, page in plain] == [
        (1, [b"1-0", b"2-0"], [b"a", b"b"], True),
        (0, [b"3-0"], [b"c"], True),
    ]
    sized = framed_pages([b"1-0 2-0 3-0 4-0", b"3 -1 -2 2", b"a\nbcd", b"0 2 2 2"])
    assert [(p, page.ids, page.values, page.plain) for p, page in sized] == [
        (0, [b"1-0", b"2-0"], [b"a\nb", -1], False),
        (2, [b"3-0", b"4-0"], [-2, b"cd"], False),
    ]
    assert framed_pages(False) == []


async def test_a_full_page_has_the_next_read_ahead(redis_url: str, prefix: str) -> None:
    """After a full page the next one is read while the engine takes it in (so it is pending
    at the consumer already), and is handed out, in order, by the next read."""
    uri = f"{redis_url}?stream={prefix}&batch=10&poll_s=0.1"
    await init(uri)
    await enqueue(uri, [b'{"ID": %d}' % i for i in range(25)])
    client = Redis.from_url(redis_url)
    try:
        async with running(from_uri(uri, consumer="c1")) as source:
            got: list[bytes] = []
            with anyio.fail_after(10):
                while len(got) < 10:
                    got += [value for _, value in await source.read()]
                await wait_until(lambda: source._ahead is not None and source._ahead.done())
            assert 20 == (await client.xpending(prefix, "contact-worker"))["pending"]
            with anyio.fail_after(10):
                while len(got) < 25:
                    got += [value for _, value in await source.read()]
            assert got == [b'{"ID": %d}' % i for i in range(25)]
    finally:
        await client.aclose()


async def test_without_a_task_group_nothing_is_read_ahead(redis_url: str, prefix: str) -> None:
    """Background work runs only in the task group given to start(): a source opened alone
    reads page by page, and nothing is pending at the consumer beyond what it handed out."""
    uri = f"{redis_url}?stream={prefix}&batch=10&poll_s=0.1"
    await init(uri)
    await enqueue(uri, [b'{"ID": %d}' % i for i in range(25)])
    client = Redis.from_url(redis_url)
    async with from_uri(uri, consumer="c1") as source:
        try:
            page = await source.read()
            await anyio.sleep(0.2)
            assert 10 == len(page)
            assert source._ahead is None
            assert 10 == (await client.xpending(prefix, "contact-worker"))["pending"]
        finally:
            await client.aclose()


async def test_a_page_read_ahead_and_never_handed_out_is_claimable_at_once(
    redis_url: str, prefix: str
) -> None:
    """A consumer that stops with a page read ahead lets it go: the next consumer (another
    name, the default 30 s claim_idle_ms) reads it first, in order, without waiting."""
    uri = f"{redis_url}?stream={prefix}&batch=10&poll_s=0.1"
    await init(uri)
    await enqueue(uri, [b'{"ID": %d}' % i for i in range(15)])
    async with running(from_uri(uri, consumer="c1")) as first:
        page = await first.read()
        await first.ack([token for token, _ in page])
        await wait_until(lambda: first._ahead is not None and first._ahead.done())
    second = from_uri(uri, consumer="c2")
    await second.open()
    try:
        got: list[bytes] = []
        with anyio.fail_after(5):  # far less than claim_idle_ms
            while len(got) < 5:
                records = await second.read()
                got += [value for _, value in records]
        assert got == [b'{"ID": %d}' % i for i in range(10, 15)]
    finally:
        await second.close()
