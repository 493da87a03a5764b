"""The ``sqlite:`` backend: an embedded spool filled by ``POST /v1/changes``, dead letters in it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.backends import Backend, Enqueue, Init

# The methods import their modules when called: the spool and its HTTP ingest load only when a
# sqlite: URI is opened.
if TYPE_CHECKING:
    from worker.backends.base import Source
    from worker.deadletters.base import DeadLetterSink
    from worker.deadletters.store import DeadLetterStore


class SqliteBackend(Backend):
    """One SQLite file holds the changes waiting and the dead letters."""

    def open_source(self, uri: str, *, follow: bool, checkpoint: str | None) -> Source | None:
        """The spool's rows in ``id`` order."""
        from worker.backends.sqlite.source import SqliteSpoolSource

        return SqliteSpoolSource.from_uri(uri)

    def open_sink(self, uri: str) -> DeadLetterSink | None:
        """The spool file's ``dead_letters`` table."""
        from worker.backends.sqlite.sink import SqliteDeadLetters

        return SqliteDeadLetters.from_uri(uri)

    def open_store(self, uri: str) -> DeadLetterStore | None:
        """The spool file's ``dead_letters`` table, marked in ``dead_letters_replayed``."""
        from worker.backends.sqlite.store import SqliteStore

        return SqliteStore.from_uri(uri)

    def producer(self) -> tuple[Init, Enqueue] | None:
        """Create the file; append rows."""
        from worker.backends.sqlite import producer

        return producer.init, producer.enqueue

    def target(self, uri: str) -> tuple[str, Enqueue] | None:
        """The spool's ``changes`` table."""
        from worker.backends.sqlite import producer
        from worker.backends.sqlite.spool import parse_uri

        return f"sqlite:{parse_uri(uri).path} changes", producer.enqueue


BACKEND = SqliteBackend()
