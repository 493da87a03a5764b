"""The ``kafka://`` dead letters for ``dlq show`` and ``dlq replay``: the topic the sink
writes, and a topic of what was replayed.

The URI is the one ``--dlq`` takes (the source's): the letters are in ``<topic>.dead-letters``
(or ``dead_topic``), each record's value one dead letter as JSON. A letter's key in the store
is ``P@OFFSET``. :meth:`KafkaStore.open` fixes the end at each partition's high watermark:
letters written afterwards wait for the next run.

Replayed letters are recorded in the topic ``<dead-letter topic>.replayed`` (created on the
first replay), one record per letter: key ``P@OFFSET``, value when it was replayed (UTC);
``open`` reads all of it. Kafka has no lock to offer: two replays of one topic at the same time
may both send a letter (at-least-once: PATCH is idempotent, the later run sends it again).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from worker.backends.kafka.producer import create_topics
from worker.backends.kafka.uri import KafkaAddress, parse_uri
from worker.deadletters.store import PAGE, DeadLetterStore, StoreError, letter_of
from worker.deadletters.summary import Stored
from worker.errors import SourceError

FETCH_WAIT_MS = 1000
"""How long one fetch waits for records that the high watermark says are there."""


class KafkaStore(DeadLetterStore):
    """Reads a dead-letter topic from its beginning to the end there was at open."""

    def __init__(self, address: KafkaAddress) -> None:
        self.address = address
        self.topic = address.dead_letter_topic
        self.replayed_topic = f"{self.topic}.replayed"
        self.name = f"kafka {address.display.rpartition('/')[0]} {self.topic}"
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._end: dict[TopicPartition, int] = {}
        self._replayed: set[str] = set()

    @classmethod
    def from_uri(cls, uri: str) -> KafkaStore:
        """The store a ``kafka://`` URI names; ConfigError if the URI is bad."""
        return cls(parse_uri(uri))

    def _error(self, exc: BaseException) -> StoreError:
        return StoreError(f"kafka {self.address.display}: {exc or type(exc).__name__}")

    async def open(self, *, replay: bool = False) -> None:
        """Connect, fix the end, read which letters were replayed; for a replay, make sure the
        replayed topic exists."""
        options = self.address.client_options()
        try:
            if replay:
                await create_topics(self.address, {self.replayed_topic: 1})
            self._consumer = consumer = AIOKafkaConsumer(
                enable_auto_commit=False, auto_offset_reset="earliest", **options
            )
            await consumer.start()
            topics = await consumer.topics()
            if self.replayed_topic in topics:
                async for key, _ in self._records(consumer, self.replayed_topic):
                    if key is not None:
                        self._replayed.add(key.decode())
            self._end = await self._ends(consumer, self.topic) if self.topic in topics else {}
            if self._end:
                consumer.assign(list(self._end))
                await consumer.seek_to_beginning(*self._end)
            if replay:
                self._producer = AIOKafkaProducer(acks="all", **options)
                await self._producer.start()
        except (KafkaError, SourceError) as exc:
            await self.close()
            raise self._error(exc) from exc

    async def _ends(self, consumer: AIOKafkaConsumer, topic: str) -> dict[TopicPartition, int]:
        """Each partition's high watermark now (learnt from a fetch: some Kafka-protocol
        brokers answer ListOffsets wrongly), without its empty partitions."""
        # The cluster's metadata, fresh: a consumer without a subscription keeps no cache of
        # the topics it was not told about.
        metadata = await consumer._client.fetch_all_metadata()
        partitions = metadata.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return {}
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends: dict[TopicPartition, int] = {}
        for tp in tps:
            while consumer.highwater(tp) is None:
                await consumer.getmany(tp, timeout_ms=100, max_records=1)
            highwater = consumer.highwater(tp)
            if highwater:
                ends[tp] = highwater
        return ends

    async def _records(self, consumer: AIOKafkaConsumer, topic: str):  # type: ignore[no-untyped-def]
        """Every record of a topic up to its end now: ``(key, value)``."""
        ends = await self._ends(consumer, topic)
        if not ends:
            return
        consumer.assign(list(ends))
        await consumer.seek_to_beginning(*ends)
        left = dict(ends)
        while left:
            fetched = await consumer.getmany(*left, timeout_ms=FETCH_WAIT_MS)
            for tp, records in fetched.items():
                for record in records:
                    if record.offset < left.get(tp, 0):
                        yield record.key, record.value
                if records and records[-1].offset + 1 >= left.get(tp, 0):
                    left.pop(tp, None)

    async def read(self, size: int = PAGE) -> list[Stored]:
        """The next letters up to the end there was at open, with their replayed flags."""
        consumer = self._consumer
        out: list[Stored] = []
        while consumer is not None and self._end and not out:
            try:
                fetched = await consumer.getmany(
                    *self._end, timeout_ms=FETCH_WAIT_MS, max_records=size
                )
            except KafkaError as exc:
                raise self._error(exc) from exc
            for tp, records in sorted(fetched.items()):
                end = self._end.get(tp)
                if end is None:
                    continue
                for record in records:
                    if record.offset >= end:
                        break
                    key = f"{tp.partition}@{record.offset}"
                    out.append(Stored(key, letter_of(record.value or b""), key in self._replayed))
                if records and records[-1].offset + 1 >= end:
                    del self._end[tp]
        return out

    async def mark(self, keys: Sequence[str], at: str) -> None:
        """One record per letter in the replayed topic, acknowledged by the brokers."""
        producer = self._producer
        if producer is None:
            raise StoreError(f"{self.name}: not open for a replay")
        try:
            futures = [
                await producer.send(self.replayed_topic, at.encode(), key=key.encode())
                for key in keys
            ]
            await asyncio.gather(*futures)
        except KafkaError as exc:
            raise self._error(exc) from exc
        self._replayed.update(keys)

    async def close(self) -> None:
        """Disconnect."""
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()
        if consumer is not None:
            await consumer.stop()
