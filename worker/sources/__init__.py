"""Inputs: one module per kind of source, all behind :class:`worker.sources.base.Source`."""

from __future__ import annotations

from worker.config import ConfigError
from worker.sources.base import Source

STORE_SCHEMES = ("postgresql", "postgres", "redis", "rediss", "sqlite")
"""Inputs that are stores of their own: their dead letters go to the same store by default."""


def open_source(uri: str, *, follow: bool = False, checkpoint: str | None = None) -> Source:
    """The source a URI names (not opened yet)."""
    scheme, sep, rest = uri.partition(":")
    if scheme == "jsonl" and sep and rest:
        from worker.sources.jsonl import JsonlSource

        return JsonlSource(rest, follow=follow, checkpoint=checkpoint)
    if scheme in STORE_SCHEMES and (follow or checkpoint):
        raise ConfigError("--follow and --checkpoint apply to jsonl: sources only")
    if scheme in ("postgresql", "postgres"):
        from worker.sources.pg_outbox import PgOutboxSource

        return PgOutboxSource.from_uri(uri)
    if scheme in ("redis", "rediss"):
        from worker.sources.redis_streams import from_uri as redis_source

        return redis_source(uri)
    if scheme == "sqlite":
        from worker.sources.sqlite_spool import SqliteSpoolSource

        return SqliteSpoolSource.from_uri(uri)
    raise ConfigError(
        f"unsupported source {uri!r}: use jsonl:PATH, jsonl:- (stdin), sqlite:PATH, redis://..."
        " or postgresql://..."
    )
