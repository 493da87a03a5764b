"""The ``redis://`` backend: Redis Streams read through a consumer group, optionally one stream
per partition, dead letters in a stream of their own."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.backends import Backend, Enqueue, Init

# The methods import their modules when called: redis-py loads only when a redis:// URI is opened,
# not at every command's start.
if TYPE_CHECKING:
    from worker.backends.base import Source
    from worker.deadletters.base import DeadLetterSink
    from worker.deadletters.store import DeadLetterStore


class RedisBackend(Backend):
    """Streams on one Redis server (``redis://``, ``rediss://`` for TLS)."""

    def open_source(self, uri: str, *, follow: bool, checkpoint: str | None) -> Source | None:
        """One stream, or one per partition (``partitions`` above 1)."""
        from worker.backends.redis.stream import from_uri

        return from_uri(uri)

    def open_sink(self, uri: str) -> DeadLetterSink | None:
        """The stream ``<stream>:dead`` (or ``dead_stream``)."""
        from worker.backends.redis.sink import from_uri

        return from_uri(uri)

    def open_store(self, uri: str) -> DeadLetterStore | None:
        """The dead-letter stream, marked in ``<dead stream>:replayed``."""
        from worker.backends.redis.store import RedisStore

        return RedisStore.from_uri(uri)

    def producer(self) -> tuple[Init, Enqueue] | None:
        """Create the group(s); append entries."""
        from worker.backends.redis import producer

        return producer.init, producer.enqueue

    def target(self, uri: str) -> tuple[str, Enqueue] | None:
        """The stream, or the partition streams."""
        from worker.backends.redis import producer
        from worker.backends.redis.uri import parse_uri

        address = parse_uri(uri)
        streams = address.stream
        if address.partitions > 1:
            streams = f"{address.stream}:0..{address.partitions - 1}"
        return f"redis {address.display} {streams}", producer.enqueue


BACKEND = RedisBackend()
