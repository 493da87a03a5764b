"""Dead-letter sinks: one module per kind, all behind ``DeadLetterSink``."""

from __future__ import annotations

from worker.config import ConfigError
from worker.deadletters.base import DeadLetterSink


def open_sink(uri: str) -> DeadLetterSink:
    """The sink a URI names (not opened yet)."""
    scheme, sep, rest = uri.partition(":")
    if scheme == "jsonl" and sep and rest and rest != "-":
        from worker.deadletters.jsonl import JsonlDeadLetters

        return JsonlDeadLetters(rest)
    if scheme in ("postgresql", "postgres"):
        from worker.deadletters.pg_table import PgDeadLetters

        return PgDeadLetters.from_uri(uri)
    if scheme in ("redis", "rediss"):
        from worker.deadletters.redis_stream import from_uri as redis_sink

        return redis_sink(uri)
    if scheme == "sqlite":
        from worker.sources.sqlite_spool import SqliteDeadLetters

        return SqliteDeadLetters.from_uri(uri)
    raise ConfigError(
        f"unsupported dead-letter sink {uri!r}: use jsonl:PATH, sqlite:PATH, redis://... or"
        " postgresql://..."
    )
