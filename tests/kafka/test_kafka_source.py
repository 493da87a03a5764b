"""The ``kafka://`` source against a real Kafka-protocol broker (tansu) on 127.0.0.1: reading,
acknowledging, committing the contiguous prefix, resuming from it, and the whole command."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.cli.test_cli import BIN, Gateway, worker_env
from tests.engine.harness import expected_state
from tests.engine.test_engine import applied_in_order, stream
from tests.kafka.conftest import Tansu
from worker.backends.base import records_of, running
from worker.backends.kafka.producer import enqueue, init
from worker.backends.kafka.source import KafkaSource, from_uri

pytestmark = pytest.mark.anyio


def uri_of(tansu: Tansu, topic: str, query: str = "") -> str:
    return f"kafka://{tansu.bootstrap}/{topic}?poll_s=0.1{query}"


async def committed(
    tansu: Tansu, topic: str, partitions: int, group: str = "contact-worker"
) -> dict[int, int | None]:
    """The group's committed offset of each partition, as another client sees it."""
    consumer = AIOKafkaConsumer(bootstrap_servers=tansu.bootstrap, group_id=group)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()


async def read_n(source: KafkaSource, n: int) -> list[tuple[Any, bytes]]:
    records: list[tuple[Any, bytes]] = []
    with anyio.fail_after(30):
        while len(records) < n:
            records += records_of(await source.read())
    return records


class TestCommits:
    async def test_commit_stops_at_the_first_record_not_acknowledged(
        self, tansu: Tansu, topic: str
    ) -> None:
        """Acks out of order commit only the contiguous prefix; a restart resumes at the first
        record not acknowledged (at-least-once: the acked one after it comes again)."""
        uri = uri_of(tansu, topic)
        await init(uri)
        lines = [orjson.dumps({"ID": str(i), "lastname": f"n{i}"}) for i in range(10)]
        assert 10 == await enqueue(uri, lines)
        source = from_uri(uri)
        async with running(source):
            records = await read_n(source, 10)
            assert [line for _, line in records] == lines
            tokens = [token for token, _ in records]
            assert [(0, i, str(i)) for i in range(10)] == tokens
            await source.ack([tokens[0], tokens[1], tokens[3], tokens[5]])
            assert {0: 2} == await committed(tansu, topic, 1)
            await source.ack([tokens[2]])
            assert {0: 4} == await committed(tansu, topic, 1)
            assert 5 == source.statistics().unacked
        again = from_uri(uri)
        async with running(again):
            records = await read_n(again, 6)
            assert [(0, i, str(i)) for i in range(4, 10)] == [t for t, _ in records]
            await again.ack([t for t, _ in records])
        assert {0: 10} == await committed(tansu, topic, 1)

    async def test_init_creates_partitions_and_is_idempotent(
        self, tansu: Tansu, topic: str
    ) -> None:
        """`init` creates the topic with its partitions and the dead-letter topic; again, it
        changes nothing; `enqueue` keys each record by its change's ID."""
        uri = uri_of(tansu, topic, "&partitions=6")
        await init(uri)
        await init(uri)
        consumer = AIOKafkaConsumer(bootstrap_servers=tansu.bootstrap)
        await consumer.start()
        try:
            topics = await consumer.topics()
            assert {topic, f"{topic}.dead-letters"} <= topics
            assert 6 == len(consumer.partitions_for_topic(topic) or ())
        finally:
            await consumer.stop()
        lines = [orjson.dumps({"ID": i, "lastname": "x"}) for i in range(60)] + [b"not json"]
        assert 61 == await enqueue(uri, lines)
        source = from_uri(uri)
        async with running(source):
            records = await read_n(source, 61)
        keys = {token[2] for token, _ in records}
        assert {str(i) for i in range(60)} | {None} == keys
        assert 6 == len({token[0] for token, _ in records})


def produce(tansu: Tansu, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
    """Produce records as a foreign producer would, keys as given."""

    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap, acks="all")
        await producer.start()
        try:
            for key, value in records:
                await producer.send_and_wait(topic, value, key=key)
        finally:
            await producer.stop()

    anyio.run(go)


def read_dead(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_end_to_end(tmp_path: Path, tansu: Tansu, topic: str) -> None:
    """init, enqueue, run, SIGTERM: every change applied in order; an undecodable record and a
    mis-keyed one dead-lettered `invalid` with a clear detail; every offset committed."""
    uri = uri_of(tansu, topic, "&partitions=3")
    gw = Gateway("--known-count", "100", "--latency", "uniform:5:20", "--record-history")
    proc: subprocess.Popen[bytes] | None = None
    try:
        env = worker_env(gw, tmp_path, WORKER_BATCH_SIZE="20")
        done = subprocess.run([BIN, "init", "--to", uri], env=env, capture_output=True, timeout=60)
        assert 0 == done.returncode, done.stderr
        changes = stream(1500, 100, seed=14)
        data = b"".join(json.dumps(c).encode() + b"\n" for c in changes)
        done = subprocess.run(
            [BIN, "enqueue", "--to", uri], input=data, env=env, capture_output=True, timeout=60
        )
        assert 0 == done.returncode, done.stderr
        produce(
            tansu,
            topic,
            [(b"7", b"\xff not json"), (b"8", b'{"ID": "9", "lastname": "Wrong"}')],
        )
        log = tmp_path / "worker.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([BIN, "run", "--source", uri], env=env, stderr=out)
        want = expected_state(changes)
        dead = tmp_path / "dead.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            gw.get("/_sim/contacts") != want or len(read_dead(dead)) < 2
        ):
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        assert want == gw.get("/_sim/contacts")
        assert applied_in_order(gw.get("/_sim/history"))
        letters = sorted(read_dead(dead), key=lambda letter: str(letter["source"]))
        assert ["invalid", "invalid"] == [letter["reason"] for letter in letters]
        mis_keyed = next(letter for letter in letters if letter["change"])
        assert "the key '8'" in mis_keyed["detail"]
        assert "ID '9'" in mis_keyed["detail"]
        assert all(letter["source"].startswith(f"kafka:{topic}/") for letter in letters)
        proc.send_signal(signal.SIGTERM)
        assert 0 == proc.wait(30), log.read_text()[-3000:]
        offsets = anyio.run(committed, tansu, topic, 3)
        assert len(changes) + 2 == sum(offset or 0 for offset in offsets.values())
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        gw.stop()
