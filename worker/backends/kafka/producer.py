"""The producer side of the ``kafka://`` input: create the topics, produce changes.

Wire format (any Kafka client can produce):

* one record per change; its value is the change as UTF-8 JSON text, exactly as one line of a
  ``jsonl:`` input (``{"ID": "123", "lastname": "Lee"}``);
* its **key is the change's ID** in its string form (``"123"`` for ``"ID": 123``), UTF-8: Kafka
  then puts every change of a contact in one partition, in the order produced, whatever the
  partitioner, as long as the partition count does not change. A record whose key is not its
  change's ID (or has no key) is dead-lettered ``invalid``, never sent;
* topic order is the order of the changes: produce the changes of one contact from one
  producer (idempotent producers, ``acks=all``, keep the order across retries).

:func:`init` creates the topic with ``partitions`` (and ``replication``) from the URI and the
dead-letter topic (``<topic>.dead-letters``); both are left as they are if they exist.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from worker.backends.base import LineChunks, SourceError
from worker.backends.kafka.uri import KafkaAddress, parse_uri

CHUNK = 1000
"""Records per flush."""
TOPIC_EXISTS = TopicAlreadyExistsError.errno


async def init(uri: str) -> None:
    """Create the topic (``partitions``, ``replication``) and its dead-letter topic if missing."""
    address = parse_uri(uri)
    await create_topics(
        address,
        {address.topic: address.partitions, address.dead_letter_topic: 1},
    )


async def create_topics(address: KafkaAddress, topics: dict[str, int]) -> None:
    """Create these topics (name -> partitions) where missing; SourceError if Kafka refuses."""
    admin = AIOKafkaAdminClient(**address.client_options())
    try:
        await admin.start()
        response = await admin.create_topics(
            [NewTopic(name, partitions, address.replication) for name, partitions in topics.items()]
        )
    except KafkaError as exc:
        raise SourceError(f"kafka {address.display}: cannot create the topics: {exc}") from exc
    finally:
        await admin.close()
    for name, code, message in (tuple(t)[:3] for t in response.topic_errors):
        if code not in (0, TOPIC_EXISTS):
            raise SourceError(f"kafka {address.display}: cannot create {name!r}: {message}")


def key_of_line(line: bytes) -> bytes | None:
    """The record key of one change line: its ID's string form, or None if it has none (the
    worker dead-letters such a record)."""
    try:
        change = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(change, dict):
        return None
    key = change.get("ID")
    if isinstance(key, bool) or not isinstance(key, str | int):
        return None
    return str(key).encode()


async def enqueue(uri: str, lines: AsyncIterable[bytes] | Iterable[bytes]) -> int:
    """Produce each non-blank line as one record keyed by its ID; the count produced (every
    one acknowledged by the brokers, ``acks=all``)."""
    address = parse_uri(uri)
    return await produce(address, address.topic, lines)


async def produce(
    address: KafkaAddress, topic: str, lines: AsyncIterable[bytes] | Iterable[bytes]
) -> int:
    """Produce the lines to ``topic`` keyed by ID, in order; the count produced."""
    producer = AIOKafkaProducer(acks="all", enable_idempotence=False, **address.client_options())
    try:
        await producer.start()
    except KafkaError as exc:
        await producer.stop()
        raise SourceError(f"cannot connect to kafka {address.display}: {exc}") from exc
    chunks = LineChunks(CHUNK)

    async def send(chunk: list[bytes]) -> None:
        for line in chunk:
            await producer.send(topic, line, key=key_of_line(line))
        await producer.flush()

    try:
        return await chunks.write(lines, send)
    except KafkaError as exc:
        message = f"kafka {address.display}: enqueue failed after {chunks.written} changes: {exc}"
        raise chunks.failed(message) from exc
    finally:
        await producer.stop()
