"""Inputs, one package per backend (jsonl, sqlite, redis, postgres), behind one scheme table.

Each package holds everything of its backend: the source, the dead-letter sink, the store that
``dlq`` reads and marks, the producer side (``init``, ``enqueue``) and its connection and URI
code. Its ``__init__`` defines a :class:`Backend` whose methods import those modules only when
asked for, so that naming a scheme never loads redis-py or asyncpg for nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, TypeVar, cast

from worker.errors import ConfigError

if TYPE_CHECKING:
    from worker.backends.base import Source
    from worker.deadletters.base import DeadLetterSink
    from worker.deadletters.store import DeadLetterStore

T = TypeVar("T")

Init = Callable[[str], Awaitable[None]]
"""Create what an input needs, idempotently (``contact-worker init --to URI``)."""
Enqueue = Callable[[str, Iterable[bytes]], Awaitable[int]]
"""Write each change line to an input; the count written (``contact-worker enqueue --to``)."""


class Backend:
    """What one kind of input offers; None where it offers nothing for that URI."""

    is_store: bool = True
    """It keeps its own dead letters: without ``--dlq`` they go to the source's URI."""

    def open_source(self, uri: str, *, follow: bool, checkpoint: str | None) -> Source | None:
        """The source ``uri`` names (not opened yet)."""
        return None

    def open_sink(self, uri: str) -> DeadLetterSink | None:
        """The dead-letter sink ``uri`` names (not opened yet)."""
        return None

    def open_store(self, uri: str) -> DeadLetterStore | None:
        """The dead-letter store ``uri`` names, for ``dlq show`` and ``dlq replay``."""
        return None

    def producer(self) -> tuple[Init, Enqueue] | None:
        """``init`` and ``enqueue``, for ``contact-worker init/enqueue --to``."""
        return None

    def target(self, uri: str) -> tuple[str, Enqueue] | None:
        """Where ``dlq replay --to uri`` writes: a name for people and the writer (the URI
        checked, nothing connected)."""
        return None


SCHEMES: dict[str, str] = {
    "jsonl": "jsonl",
    "sqlite": "sqlite",
    "redis": "redis",
    "rediss": "redis",
    "postgresql": "postgres",
    "postgres": "postgres",
    "kafka": "kafka",
}
"""The one scheme table: URI scheme -> the package under :mod:`worker.backends` serving it."""


def backend_for(uri: str) -> Backend | None:
    """The backend of ``uri``'s scheme, or None if no backend serves it."""
    package = SCHEMES.get(uri.partition(":")[0])
    if package is None:
        return None
    return cast(Backend, importlib.import_module(f"{__name__}.{package}").BACKEND)


def is_store(uri: str) -> bool:
    """Whether ``uri`` names an input that keeps its own dead letters (sqlite, redis,
    postgresql): ``--dlq`` then defaults to it."""
    backend = backend_for(uri)
    return backend is not None and backend.is_store


def offered(uri: str, offer: Callable[[Backend], T | None], unsupported: str) -> T:
    """What ``offer`` asks of the backend of ``uri``; ConfigError(``unsupported``) where there
    is no such backend or it offers nothing for that URI."""
    backend = backend_for(uri)
    found = offer(backend) if backend is not None else None
    if found is None:
        raise ConfigError(unsupported)
    return found


def open_source(uri: str, *, follow: bool = False, checkpoint: str | None = None) -> Source:
    """The source a URI names (not opened yet)."""
    if (follow or checkpoint) and is_store(uri):
        raise ConfigError("--follow and --checkpoint apply to jsonl: sources only")
    return offered(
        uri,
        lambda backend: backend.open_source(uri, follow=follow, checkpoint=checkpoint),
        f"unsupported source {uri!r}: use jsonl:PATH, jsonl:- (stdin), sqlite:PATH,"
        " redis://..., postgresql://... or kafka://...",
    )


def open_sink(uri: str) -> DeadLetterSink:
    """The dead-letter sink a URI names (not opened yet)."""
    return offered(
        uri,
        lambda backend: backend.open_sink(uri),
        f"unsupported dead-letter sink {uri!r}: use jsonl:PATH, sqlite:PATH, redis://...,"
        " postgresql://... or kafka://...",
    )


def open_store(uri: str) -> DeadLetterStore:
    """The store a ``--dlq`` URI names (not opened yet); ConfigError if the URI is bad."""
    return offered(
        uri,
        lambda backend: backend.open_store(uri),
        f"unsupported dead-letter store {uri!r}: use the URI given to --dlq: jsonl:PATH,"
        " sqlite:PATH, redis://...?stream=..., postgresql://...?table=... or kafka://HOST:PORT/TOPIC",
    )


def producer_for(uri: str) -> tuple[Init, Enqueue]:
    """``init`` and ``enqueue`` of the input a URI names."""
    return offered(
        uri,
        lambda backend: backend.producer(),
        f"unsupported input {uri!r}: use sqlite:PATH, redis://HOST:PORT/DB, postgresql://..."
        " or kafka://HOST:PORT/TOPIC",
    )
