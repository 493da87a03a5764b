"""The dead-letter stores ``dlq`` reads and marks: one module per kind ``--dlq`` accepts."""

from __future__ import annotations

from worker.config import ConfigError
from worker.dlq.stores.base import DeadLetterStore, StoreBusy, StoreError

__all__ = ["DeadLetterStore", "StoreBusy", "StoreError", "open_store"]


def open_store(uri: str) -> DeadLetterStore:
    """The store a ``--dlq`` URI names (not opened yet); ConfigError if the URI is bad."""
    scheme, sep, rest = uri.partition(":")
    if scheme == "jsonl" and sep and rest and rest != "-":
        from worker.dlq.stores.jsonl import JsonlStore

        return JsonlStore(rest)
    if scheme in ("postgresql", "postgres"):
        from worker.dlq.stores.pg import PgStore

        return PgStore.from_uri(uri)
    if scheme in ("redis", "rediss"):
        from worker.dlq.stores.redis import RedisStore

        return RedisStore.from_uri(uri)
    if scheme == "sqlite":
        from worker.dlq.stores.sqlite import SqliteStore

        return SqliteStore.from_uri(uri)
    raise ConfigError(
        f"unsupported dead-letter store {uri!r}: use the URI given to --dlq: jsonl:PATH,"
        " sqlite:PATH, redis://...?stream=... or postgresql://...?table=..."
    )
