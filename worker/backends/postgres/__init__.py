"""The ``postgresql://`` backend: a transactional-outbox table claimed under leases, optionally
by partition, dead letters in ``<table>_dead`` beside it.

asyncpg ties this backend to the asyncio backend of anyio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.backends import Backend, Enqueue, Init

# The methods import their modules when called: asyncpg loads only when a postgresql:// URI is
# opened, not at every command's start.
if TYPE_CHECKING:
    from worker.backends.base import Source
    from worker.deadletters.base import DeadLetterSink
    from worker.deadletters.store import DeadLetterStore


class PostgresBackend(Backend):
    """An outbox table in a PostgreSQL database (``postgresql://``, ``postgres://``)."""

    def open_source(self, uri: str, *, follow: bool, checkpoint: str | None) -> Source | None:
        """The outbox's rows in ``id`` order."""
        from worker.backends.postgres.outbox import PgOutboxSource

        return PgOutboxSource.from_uri(uri)

    def open_sink(self, uri: str) -> DeadLetterSink | None:
        """The table ``<table>_dead``."""
        from worker.backends.postgres.sink import PgDeadLetters

        return PgDeadLetters.from_uri(uri)

    def open_store(self, uri: str) -> DeadLetterStore | None:
        """The table ``<table>_dead``, marked by ``replayed_at``."""
        from worker.backends.postgres.store import PgStore

        return PgStore.from_uri(uri)

    def producer(self) -> tuple[Init, Enqueue] | None:
        """Create the tables and trigger; insert rows."""
        from worker.backends.postgres import producer

        return producer.init, producer.enqueue

    def target(self, uri: str) -> tuple[str, Enqueue] | None:
        """The outbox table."""
        from worker.backends.postgres import producer
        from worker.backends.postgres.uri import parse_uri

        target = parse_uri(uri)
        return f"postgresql {target.display} {target.outbox}", producer.enqueue


BACKEND = PostgresBackend()
