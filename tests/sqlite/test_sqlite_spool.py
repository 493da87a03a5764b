"""The ``sqlite:`` spool, its HTTP ingest, and the engine draining it, over real sockets."""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
import pytest
from aiohttp import web

from tests.engine.harness import expected_state, settings
from worker.backends.sqlite.ingest import INGEST_STATS, add_ingest_routes, parse_changes
from worker.backends.sqlite.sink import SqliteDeadLetters
from worker.backends.sqlite.source import SqliteSpoolSource
from worker.backends.sqlite.spool import SpoolOptions, parse_uri
from worker.config import Secret
from worker.engine import Ending, Engine, Result
from worker.errors import ConfigError
from worker.sender import Sender
from worker.sim.gateway import SimConfig, Simulator, serve

pytestmark = pytest.mark.anyio

TOKEN = "test-ingest-token"
NDJSON = "application/x-ndjson"


# -- helpers ---------------------------------------------------------------------------------


@asynccontextmanager
async def opened(uri: str) -> AsyncIterator[SqliteSpoolSource]:
    """A ``sqlite:`` source, open for the block."""
    source = SqliteSpoolSource.from_uri(uri)
    await source.open()
    try:
        yield source
    finally:
        await source.close()


@asynccontextmanager
async def ingest_server(source: SqliteSpoolSource, **options: Any) -> AsyncIterator[str]:
    """The ingest route on 127.0.0.1 (a free port) for the block; yields its URL."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    options.setdefault("token", TOKEN)
    add_ingest_routes(app, source.spool, **options)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1/changes"
    finally:
        await runner.cleanup()


@dataclass
class Answer:
    """An HTTP answer: status, JSON body, headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]


async def post(
    http: aiohttp.ClientSession,
    url: str,
    data: bytes | Any,
    *,
    token: str | None = TOKEN,
    content_type: str = "application/json",
    authorization: str | None = None,
) -> Answer:
    """POST a body (JSON-encoded unless bytes) and read the JSON answer."""
    headers = {"Content-Type": content_type}
    if authorization is not None:
        headers["Authorization"] = authorization
    elif token is not None:
        headers["Authorization"] = f"Bearer {token}"
    body = data if isinstance(data, bytes) else orjson.dumps(data)
    async with http.post(url, data=body, headers=headers) as response:
        return Answer(response.status, orjson.loads(await response.read()), dict(response.headers))


def ndjson(changes: list[Any]) -> bytes:
    """Changes one per line."""
    return b"".join(orjson.dumps(c) + b"\n" for c in changes)


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll until the predicate holds (fails the test after ``timeout_s``)."""
    with anyio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 - polling counters of other tasks
            await anyio.sleep(0.01)


async def stored(source: SqliteSpoolSource) -> list[dict[str, Any]]:
    """The changes in the spool's table, in id order, without handing them out."""
    return [orjson.loads(change) for _, change in await source.spool.fetch(0, 1_000_000)]


@pytest.fixture
def uri(tmp_path: Path) -> str:
    """A spool file of this test's own, with a short fallback poll."""
    return f"sqlite:{tmp_path / 'spool.db'}?poll_s=0.05"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """One aiohttp client session."""
    async with aiohttp.ClientSession() as session:
        yield session


# -- URIs ------------------------------------------------------------------------------------


class TestUri:
    def test_path_and_defaults(self) -> None:
        """A relative path with no parameters: the documented defaults."""
        assert SpoolOptions("spool.db") == parse_uri("sqlite:spool.db")

    def test_absolute_path_and_parameters(self) -> None:
        """Parameters come from the query string; poll_s and busy_timeout_s are seconds."""
        options = parse_uri(
            "sqlite:/data/spool.db?high_water=500&max_body_bytes=2048&batch=10"
            "&poll_s=0.25&busy_timeout_s=0"
        )
        assert SpoolOptions("/data/spool.db", 500, 2048, 10, 0.25, 0.0) == options

    @pytest.mark.parametrize(
        ("uri", "message"),
        [
            ("sqlite:", "names no file"),
            ("sqlite:?batch=3", "names no file"),
            ("sqlite::memory:", "must be a file path"),
            ("sqlite:spool.db?high_watermark=5", "unknown parameter 'high_watermark'"),
            ("sqlite:spool.db?high_water=0", "high_water must be at least 1"),
            ("sqlite:spool.db?batch=many", "batch must be an integer"),
            ("sqlite:spool.db?poll_s=-1", "poll_s must be at least 0.001 s"),
            ("sqlite:spool.db?lease_s=1", "unknown parameter 'lease_s' \\(known: batch, "),
            ("sqlite:spool.db?poll_ms=x", "poll_ms must be a number"),
            ("jsonl:spool.db", "not a sqlite URI"),
        ],
    )
    def test_bad_uris_are_configuration_errors(self, uri: str, message: str) -> None:
        """A URI that cannot work is refused before anything opens, naming the problem."""
        with pytest.raises(ConfigError, match=message):
            parse_uri(uri)


# -- the spool and the source ----------------------------------------------------------------


def _file_settings(path: str) -> tuple[str, int]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA journal_mode").fetchone()[0], conn.total_changes
    finally:
        conn.close()


ROOT = str(Path(__file__).resolve().parents[2])
_WRITER = """
import sys, anyio
from worker.backends.sqlite.spool import Spool

async def main() -> None:
    spool = Spool(sys.argv[1])
    await spool.open()
    await spool.append([b'{"ID": 1, "lastname": "x"}'] * 5)
    print("stored", flush=True)
    await anyio.sleep(60)

anyio.run(main)
"""


def _insert_elsewhere(path: str, n: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for i in range(n):
            conn.execute(
                "INSERT INTO changes (change, received_at) VALUES (?, 0)",
                (b'{"ID":%d,"lastname":"y"}' % (i + 10),),
            )
    finally:
        conn.close()


class TestSpool:
    async def test_durability_settings(self, tmp_path: Path, uri: str) -> None:
        """The file is in WAL mode and the spool's connection commits with synchronous=FULL."""
        async with opened(uri) as source:
            synchronous = await source.spool._call(
                lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0]
            )
            assert 2 == synchronous  # FULL
            await source.spool.delete([1])  # switches to NORMAL for the delete only
            synchronous = await source.spool._call(
                lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0]
            )
            assert 2 == synchronous
        mode, _ = await anyio.to_thread.run_sync(_file_settings, str(tmp_path / "spool.db"))
        assert "wal" == mode

    async def test_rows_handed_out_in_id_order_once(self, uri: str) -> None:
        """read() hands out rows in id order; rows handed out are not handed out again; a read
        with nothing new waits, and an append wakes it with only the new rows."""
        async with opened(uri.replace("poll_s=0.05", "poll_s=60&batch=2")) as source:
            spool = source.spool
            await spool.append([b'{"ID":1,"lastname":"a"}', b'{"ID":2,"lastname":"b"}'])
            await spool.append([b'{"ID":3,"lastname":"c"}'])
            assert [1, 2] == [token for token, _ in await source.read()]
            assert [(3, b'{"ID":3,"lastname":"c"}')] == list(await source.read())
            got: list[Any] = []

            async def reader() -> None:
                got.extend(await source.read())

            with anyio.fail_after(5):  # far below poll_ms: the append itself wakes the reader
                async with anyio.create_task_group() as tg:
                    tg.start_soon(reader)
                    await anyio.sleep(0.05)
                    assert [] == got
                    await spool.append([b'{"ID":4,"lastname":"d"}'])
            assert [4] == [token for token, _ in got]

    async def test_ack_deletes_rows_and_ids_are_never_reused(self, uri: str) -> None:
        """An ack deletes exactly its rows; after deleting the highest row, new rows still get
        higher ids (AUTOINCREMENT), so they sort after everything handed out."""
        async with opened(uri) as source:
            await source.spool.append([b'{"ID":%d,"lastname":"x"}' % i for i in range(1, 6)])
            await source.read()
            await source.ack([2, 5])
            assert 3 == source.spool.rows
            assert [1, 3, 4] == [int(c["ID"]) for c in await stored(source)]
            await source.spool.append([b'{"ID":6,"lastname":"y"}'])
            assert [(6, b'{"ID":6,"lastname":"y"}')] == list(await source.read())
            assert 4 == await source.spool.count() == source.spool.rows

    async def test_unacked_rows_come_back_after_restart_in_id_order(self, uri: str) -> None:
        """Rows handed out and not acked are read again, in id order, after close and reopen;
        acked rows are gone."""
        async with opened(uri) as source:
            await source.spool.append([b'{"ID":%d,"lastname":"x"}' % i for i in range(1, 8)])
            assert 7 == len(await source.read())
            await source.ack([1, 4, 7])
        async with opened(uri) as source:
            assert 4 == source.spool.rows
            assert [2, 3, 5, 6] == [token for token, _ in await source.read()]

    async def test_rows_from_another_process_found_by_poll_and_counted(
        self, tmp_path: Path, uri: str
    ) -> None:
        """Rows another connection commits (no wake-up) are read after the fallback poll, and
        the count of rows waiting follows them (PRAGMA data_version)."""
        async with opened(uri) as source:
            await source.spool.append([b'{"ID":1,"lastname":"x"}'])
            assert 1 == len(await source.read())
            await anyio.to_thread.run_sync(_insert_elsewhere, str(tmp_path / "spool.db"), 3)
            with anyio.fail_after(5):
                assert [2, 3, 4] == [token for token, _ in await source.read()]
            assert 4 == source.spool.rows
            await source.ack([1, 2])
            assert 2 == source.spool.rows

    async def test_init_and_enqueue(self, tmp_path: Path) -> None:
        """init creates the file and tables (twice is fine); enqueue stores each non-blank line
        as it is, in order, and returns the count."""
        from worker.backends.sqlite.producer import enqueue, init

        uri = f"sqlite:{tmp_path / 'q.db'}"
        await init(uri)
        await init(uri)
        lines = [b'{"ID":1,"lastname":"a"}\n', b"  \n", b"not json\r\n", b'{"ID":2,"phone":"1"}']
        assert 3 == await enqueue(uri, lines)
        async with opened(uri) as source:
            assert [b'{"ID":1,"lastname":"a"}', b"not json", b'{"ID":2,"phone":"1"}'] == [
                change for _, change in await source.read()
            ]

    async def test_committed_rows_survive_kill_9(self, tmp_path: Path, uri: str) -> None:
        """Rows whose append returned survive a SIGKILL of the process that wrote them (they
        are still only in the WAL, which the next open recovers)."""
        path = str(tmp_path / "spool.db")
        async with await anyio.open_process(
            [sys.executable, "-c", _WRITER, path], cwd=ROOT
        ) as proc:
            assert proc.stdout is not None
            said = b""
            with anyio.fail_after(20):
                while b"stored" not in said:
                    said += await proc.stdout.receive()
            proc.kill()
            await proc.wait()
        assert (tmp_path / "spool.db-wal").stat().st_size > 0
        async with opened(uri) as source:
            assert 5 == source.spool.rows
            assert [1, 2, 3, 4, 5] == [token for token, _ in await source.read()]

    async def test_describe_names_file_and_rows(self, uri: str) -> None:
        """Dead letters say where a change came from: the file and the row ids."""
        source = SqliteSpoolSource.from_uri(uri)
        assert "sqlite:spool.db/42" == source.describe([42])
        assert "sqlite:spool.db/42,57" == source.describe([42, 57])

    async def test_source_and_sink_share_one_spool(self, uri: str) -> None:
        """The source and the dead-letter sink on one file share one connection; closing one
        leaves the other working."""
        sink = SqliteDeadLetters.from_uri(uri.replace("poll_s=0.05", "high_water=3"))
        async with opened(uri) as source:
            await sink.open()
            try:
                assert sink.spool is source.spool
            finally:
                await sink.close()
            await source.spool.append([b'{"ID":1,"lastname":"x"}'])
            assert 1 == len(await source.read())

    async def test_unopenable_file_is_a_source_error(self, tmp_path: Path) -> None:
        """A spool in a directory that does not exist cannot open: SourceError naming it."""
        from worker.backends.base import SourceError

        source = SqliteSpoolSource.from_uri(f"sqlite:{tmp_path / 'missing' / 'spool.db'}")
        with pytest.raises(SourceError, match="cannot open spool"):
            await source.open()
        await source.close()


# -- parsing request bodies (pure) -----------------------------------------------------------


class TestParse:
    def test_object_array_and_ndjson(self) -> None:
        """One object, an array, or NDJSON (by content type or sniffed) give the same changes."""
        a, b = {"ID": 1, "lastname": "Lee"}, {"ID": "2", "unsubscribed": True}
        texts = [orjson.dumps(a), orjson.dumps(b)]
        assert [texts[0]] == parse_changes(orjson.dumps(a), "application/json").changes
        assert texts == parse_changes(orjson.dumps([a, b]), "application/json").changes
        assert texts == parse_changes(ndjson([a, b]), NDJSON).changes
        assert texts == parse_changes(ndjson([a, b]), "text/plain").changes
        assert texts == parse_changes(b"\r\n" + ndjson([a, b]).replace(b"\n", b"\r\n"), "").changes

    def test_invalid_items_by_index(self) -> None:
        """Invalid items are refused with their array index or NDJSON line number (0-based,
        blank lines counted); the valid ones are kept in order."""
        items: list[Any] = [{"ID": 1, "lastname": "a"}, {"lastname": "b"}, 7, {"ID": 2, "x": "y"}]
        parsed = parse_changes(orjson.dumps(items), "application/json")
        assert [orjson.dumps(items[0])] == parsed.changes
        assert [1, 2, 3] == [r["index"] for r in parsed.rejected]
        assert "missing ID" == parsed.rejected[0]["reason"]
        assert "unknown field 'x'" == parsed.rejected[2]["reason"]
        body = b'{"ID": 1, "lastname": "a"}\n\n{"ID": 2, "lastname": \n{"ID": 3, "phone": 5}\n'
        parsed = parse_changes(body, NDJSON)
        assert 1 == len(parsed.changes)
        assert [2, 3] == [r["index"] for r in parsed.rejected]
        assert parsed.rejected[0]["reason"].startswith("not valid JSON")
        assert "phone" in parsed.rejected[1]["reason"]

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            (b"", "empty body"),
            (b" \n ", "empty body"),
            (b"[]", "array is empty"),
            (b'"ID"', "must be a change object"),
            (b'[{"ID": 1, "lastname": "a"}', "not valid JSON"),
        ],
    )
    def test_unusable_bodies(self, body: bytes, message: str) -> None:
        """A body that holds no changes at all is refused as a whole, saying why."""
        parsed = parse_changes(body, "application/json")
        assert parsed.error is not None and message in parsed.error
        assert ([], []) == (parsed.changes, parsed.rejected)


# -- the ingest over HTTP --------------------------------------------------------------------


class TestIngest:
    async def test_object_array_and_ndjson_stored(
        self, uri: str, http: aiohttp.ClientSession
    ) -> None:
        """Each body form is answered 202 with its count, after its changes are in the table,
        in body order."""
        changes = [{"ID": i, "lastname": f"n{i}"} for i in range(1, 7)]
        async with opened(uri) as source, ingest_server(source) as url:
            one = await post(http, url, changes[0])
            array = await post(http, url, changes[1:3])
            lines = await post(http, url, ndjson(changes[3:5]), content_type=NDJSON)
            sniffed = await post(http, url, ndjson(changes[5:]), content_type="text/plain")
            assert [202] * 4 == [a.status for a in (one, array, lines, sniffed)]
            assert [1, 2, 2, 1] == [a.body["accepted"] for a in (one, array, lines, sniffed)]
            assert {"accepted": 1, "rejected": []} == one.body
            assert changes == await stored(source)
            assert 6 == source.spool.rows

    @pytest.mark.parametrize(
        "authorization",
        [None, "Bearer wrong-token", f"Bearer {TOKEN}x", f"Basic {TOKEN}", "Bearer", ""],
    )
    async def test_missing_or_wrong_token_is_401(
        self, uri: str, http: aiohttp.ClientSession, authorization: str | None
    ) -> None:
        """Without the right bearer token: 401 with a JSON error and a Bearer challenge;
        nothing is stored."""
        async with opened(uri) as source, ingest_server(source) as url:
            answer = await post(
                http, url, {"ID": 1, "lastname": "x"}, token=None, authorization=authorization
            )
            assert 401 == answer.status
            assert "bearer token" in answer.body["error"]
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
            assert [] == await stored(source)

    @pytest.mark.parametrize("token", [None, ""])
    async def test_no_token_configured_disables_ingest(
        self, uri: str, http: aiohttp.ClientSession, token: str | None
    ) -> None:
        """Without a configured token (or with an empty one) every request is refused 503,
        whatever it carries; nothing is stored."""
        async with opened(uri) as source, ingest_server(source, token=token) as url:
            answer = await post(http, url, {"ID": 1, "lastname": "x"}, token="")
            assert 503 == answer.status
            assert "ingest disabled: set WORKER_INGEST_TOKEN" == answer.body["error"]
            assert [] == await stored(source)

    async def test_oversize_body_is_413(self, uri: str, http: aiohttp.ClientSession) -> None:
        """A body over the limit is refused 413, whether its Content-Length says so or it
        arrives chunked; nothing is stored. A body at the limit passes."""
        change = orjson.dumps({"ID": 1, "lastname": "x" * 100})
        async with opened(uri) as source, ingest_server(source, max_body_bytes=len(change)) as url:
            big = orjson.dumps({"ID": 1, "lastname": "x" * 101})
            assert 413 == (await post(http, url, big)).status

            async def chunks() -> AsyncIterator[bytes]:
                yield big[:50]
                yield big[50:]

            headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
            async with http.post(url, data=chunks(), headers=headers) as response:
                assert 413 == response.status
                assert "larger than" in (await response.json())["error"]
            assert [] == await stored(source)
            assert 202 == (await post(http, url, change)).status

    async def test_backpressure_above_high_water(
        self, uri: str, http: aiohttp.ClientSession
    ) -> None:
        """Once the spool holds high_water rows, requests are refused 503 with Retry-After and
        nothing is stored; after acks bring it below, they are accepted again."""
        async with (
            opened(uri) as source,
            ingest_server(source, high_water=3, retry_after_s=7) as url,
        ):
            batch = [{"ID": i, "lastname": "x"} for i in range(1, 4)]
            assert 202 == (await post(http, url, batch)).status
            refused = await post(http, url, {"ID": 9, "lastname": "y"})
            assert 503 == refused.status
            assert "7" == refused.headers["Retry-After"]
            assert "high-water" in refused.body["error"]
            assert 3 == len(await stored(source))
            await source.ack([token for token, _ in await source.read()][:1])
            assert 202 == (await post(http, url, {"ID": 9, "lastname": "y"})).status

    async def test_invalid_items_reported_and_never_stored(
        self, uri: str, http: aiohttp.ClientSession
    ) -> None:
        """Invalid items are answered per index with the validator's reason and not stored;
        when none is valid the answer is 400 with the same shape."""
        items: list[Any] = [
            {"ID": 1, "lastname": "Lee"},
            {"ID": 2, "birthday": "2026-02-30"},
            {"lastname": "no id"},
            {"ID": 3, "extra2": "2B"},
        ]
        async with opened(uri) as source, ingest_server(source) as url:
            answer = await post(http, url, items)
            assert 202 == answer.status
            assert 2 == answer.body["accepted"]
            assert [1, 2] == [r["index"] for r in answer.body["rejected"]]
            assert "2026-02-30" in answer.body["rejected"][0]["reason"]
            assert "missing ID" == answer.body["rejected"][1]["reason"]
            assert [items[0], items[3]] == await stored(source)
            none_valid = await post(http, url, items[1:3])
            assert 400 == none_valid.status
            assert {
                "accepted": 0,
                "rejected": [
                    {"index": 0, "reason": answer.body["rejected"][0]["reason"]},
                    {"index": 1, "reason": "missing ID"},
                ],
            } == none_valid.body
            not_json = await post(http, url, b"{nope")
            assert 400 == not_json.status
            assert not_json.body["error"].startswith("not valid JSON")
            assert 2 == len(await stored(source))
            stats = source.spool.statistics()
            assert (2, 2) == (stats.rows, stats.appended)

    async def test_counters(self, uri: str, http: aiohttp.ClientSession) -> None:
        """The endpoint counts answers by status, accepted changes and refused items."""
        app = web.Application()
        async with opened(uri) as source:
            add_ingest_routes(app, source.spool, token=TOKEN)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            try:
                await web.TCPSite(runner, "127.0.0.1", 0).start()
                url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/changes"
                await post(http, url, [{"ID": 1, "lastname": "a"}, {"ID": 2}])
                await post(http, url, {"ID": 1, "lastname": "a"}, token="bad")
            finally:
                await runner.cleanup()
        stats = app[INGEST_STATS]
        assert ({202: 1, 401: 1}, 1, 1) == (dict(stats.responses), stats.accepted, stats.rejected)


# -- the engine draining the spool -----------------------------------------------------------


@dataclass
class Pipeline:
    """A running worker: spool source and sink, ingest URL, engine, simulated API."""

    source: SqliteSpoolSource
    sink: SqliteDeadLetters
    url: str
    engine: Engine
    sim: Simulator
    results: list[Result]


@asynccontextmanager
async def pipeline(uri: str, sim: Simulator) -> AsyncIterator[Pipeline]:
    """The engine running on the spool against the simulator, with the ingest in front; on
    leaving, the engine is shut down and must end SHUTDOWN."""
    source = SqliteSpoolSource.from_uri(uri)
    sink = SqliteDeadLetters.from_uri(uri)
    await source.open()
    await sink.open()
    results: list[Result] = []
    try:
        async with (
            serve(sim) as api_url,
            Sender(api_url, "demo", Secret("demo-secret"), concurrency=4, timeout_s=5.0) as sender,
            ingest_server(source) as url,
        ):
            engine = Engine(source, sink, sender, settings(batch=10, linger_s=0.01))

            async def run() -> None:
                results.append(await engine.run())

            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                try:
                    yield Pipeline(source, sink, url, engine, sim, results)
                finally:
                    engine.shutdown()
            assert [Ending.SHUTDOWN] == [r.ending for r in results]
    finally:
        await sink.close()
        await source.close()


class TestEngine:
    async def test_posted_changes_applied_and_rows_deleted(
        self, uri: str, http: aiohttp.ClientSession
    ) -> None:
        """Changes posted as an object, an array and NDJSON are applied at the API with each
        contact's last values, in order, and their rows are deleted; shutdown ends the run."""
        changes = [{"ID": i % 40 + 1, "extra1": str(i)} for i in range(300)]
        sim = Simulator(SimConfig(known_count=40, record_history=True))
        async with pipeline(uri, sim) as p:
            assert 202 == (await post(http, p.url, changes[0])).status
            assert 202 == (await post(http, p.url, changes[1:150])).status
            assert (
                202 == (await post(http, p.url, ndjson(changes[150:]), content_type=NDJSON)).status
            )
            await wait_until(lambda: p.engine.stats.acked == 300)
            assert 0 == p.source.spool.rows
            assert 0 == await p.source.spool.count()
        assert expected_state(changes) == sim.contacts
        for objs in sim.history.values():
            seqs = [int(str(o["extra1"])) for o in objs]
            assert seqs == sorted(seqs)
        assert 0 == sim.stats.overlapping_id_requests

    async def test_unknown_ids_dead_lettered_in_the_table(
        self, uri: str, http: aiohttp.ClientSession
    ) -> None:
        """Changes to IDs the API does not know end in the dead-letter table (not_found, with
        their row), their rows are deleted, and every other change is applied."""
        changes = [{"ID": i, "lastname": f"n{i}"} for i in range(1, 31)]
        changes[4] = {"ID": 905, "lastname": "gone"}
        changes[20] = {"ID": 921, "lastname": "gone"}
        sim = Simulator(SimConfig(known_count=30))
        async with pipeline(uri, sim) as p:
            assert 202 == (await post(http, p.url, changes)).status
            await wait_until(lambda: p.engine.stats.acked == 30)
            letters = await p.sink.spool.dead_letters()
            assert 0 == await p.source.spool.count()
        assert [("not_found", 404)] * 2 == [(d["reason"], d["status"]) for d in letters]
        assert [905, 921] == sorted(d["change"]["ID"] for d in letters)
        assert {"sqlite:spool.db/5", "sqlite:spool.db/21"} == {d["source"] for d in letters}
        assert 28 == len(sim.contacts)

    async def test_changes_stored_while_the_api_is_away_survive_a_restart(
        self, uri: str, http: aiohttp.ClientSession
    ) -> None:
        """Changes accepted while nothing drains the spool are still there after it is closed
        and opened again, and the next run applies them all."""
        changes = [{"ID": i, "firstname": f"f{i}"} for i in range(1, 21)]
        async with opened(uri) as source, ingest_server(source) as url:
            assert 202 == (await post(http, url, changes)).status
            assert 20 == len(await source.read())  # handed out, never acked
        sim = Simulator(SimConfig(known_count=20))
        async with pipeline(uri, sim) as p:
            assert 20 == p.source.spool.rows
            await wait_until(lambda: p.engine.stats.acked == 20)
        assert expected_state(changes) == sim.contacts
