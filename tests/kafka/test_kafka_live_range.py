"""A partition taken while producers keep writing to it: its replay range ends where the
partition ended when it was taken, not where a live feed has moved it since.

What a replica that held the partition before could have read ends at the partition's end
when this one took it (records written after were never read by anyone). Until 2026-12-06 the
range ended only once a read found the partition's end with nothing fetched and not handed out
yet: under a steady feed every fetch brings records, so the range stayed open until ``window``
records (10,000) were read, and every contact of the partition was held meanwhile. The fault
campaign showed it (each contact applied once, after the feed stopped).
"""

from __future__ import annotations

import anyio
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.kafka.conftest import Tansu
from tests.kafka.test_kafka_rebalance import Replays, until
from tests.kafka.test_kafka_source import uri_of
from worker.backends.base import records_of, running
from worker.backends.kafka.producer import enqueue, init
from worker.backends.kafka.source import from_uri

pytestmark = pytest.mark.anyio


def change(i: int) -> bytes:
    return orjson.dumps({"ID": str(i % 50), "lastname": f"v{i}"})


async def test_the_range_of_a_partition_fed_live_ends_where_it_ended_when_taken(
    tansu: Tansu, topic: str
) -> None:
    uri = uri_of(tansu, topic)
    await init(uri)
    backlog = 30  # written before the partition is taken: what a crashed holder may have read
    await enqueue(uri, [change(i) for i in range(backlog)])
    source = from_uri(uri)
    replays = Replays()
    source.replay = replays
    producer = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap, acks="all")
    await producer.start()
    read: list[tuple[object, bytes]] = []
    fed = [backlog]
    try:
        async with anyio.create_task_group() as feeding:

            async def feed() -> None:  # a steady feed: 10 records every 10 ms, never a lull
                while True:
                    for _ in range(10):
                        i = fed[0]
                        await producer.send(topic, change(i), key=str(i % 50).encode())
                        fed[0] += 1
                    await producer.flush()
                    await anyio.sleep(0.01)

            feeding.start_soon(feed)  # already running when the partition is taken
            async with running(source), anyio.create_task_group() as reading:

                async def consume() -> None:  # as the engine does: work between reads
                    while True:
                        read.extend(records_of(await source.read()))
                        await anyio.sleep(0.05)

                reading.start_soon(consume)
                with anyio.fail_after(30):
                    await until(lambda: bool(replays.started))
                fed_when_taken = fed[0]
                with anyio.fail_after(20):
                    await until(lambda: bool(replays.done))
                ended_after = len(read)
                reading.cancel_scope.cancel()
            feeding.cancel_scope.cancel()
    finally:
        await producer.stop()
    assert replays.done == replays.started == [f"kafka:{topic}/0#1"]
    # Ended with the records that existed when the partition was taken, or soon after (the
    # end is the partition's end at its first fetch), not at the window of 10,000 (as before:
    # 10,000 read, 1,850 written when it was taken).
    assert backlog <= ended_after <= fed_when_taken + 500 < 10_000
