"""The ``kafka://`` backend: a topic read through a consumer group, records keyed by contact
ID, dead letters in a topic of their own."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.backends import Backend, Enqueue, Init

# The methods import their modules when called: aiokafka loads only when a kafka:// URI is
# opened.
if TYPE_CHECKING:
    from worker.backends.base import Source
    from worker.deadletters.base import DeadLetterSink
    from worker.deadletters.store import DeadLetterStore


class KafkaBackend(Backend):
    """Topics on a Kafka cluster (any Kafka-protocol broker)."""

    def open_source(self, uri: str, *, follow: bool, checkpoint: str | None) -> Source | None:
        """A member of the URI's consumer group."""
        from worker.backends.kafka.source import from_uri

        return from_uri(uri)

    def open_sink(self, uri: str) -> DeadLetterSink | None:
        """The topic ``<topic>.dead-letters`` (or ``dead_topic``)."""
        from worker.backends.kafka.sink import from_uri

        return from_uri(uri)

    def open_store(self, uri: str) -> DeadLetterStore | None:
        """The dead-letter topic, marked in ``<dead-letter topic>.replayed``."""
        from worker.backends.kafka.store import KafkaStore

        return KafkaStore.from_uri(uri)

    def producer(self) -> tuple[Init, Enqueue] | None:
        """Create the topics; produce records keyed by ID."""
        from worker.backends.kafka import producer

        return producer.init, producer.enqueue

    def target(self, uri: str) -> tuple[str, Enqueue] | None:
        """The topic."""
        from worker.backends.kafka import producer
        from worker.backends.kafka.uri import parse_uri

        return f"kafka {parse_uri(uri).display}", producer.enqueue


BACKEND = KafkaBackend()
