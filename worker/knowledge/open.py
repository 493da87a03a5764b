"""Which knowledge store a run uses: the input's own, or what ``--state`` names."""

from __future__ import annotations

from collections.abc import Sequence

from worker.errors import ConfigError
from worker.knowledge.base import KnowledgeStore


def knowledge_store(source: str, state: str | None) -> KnowledgeStore | None:
    """The store for ``source`` (not opened), or None to keep knowledge in memory only.

    ``--state memory``: none; ``--state sqlite:PATH``: that file, whatever the input; else the
    input's own: a table of the ``sqlite:`` spool, sorted sets beside the ``redis://`` stream,
    a table beside the ``postgresql://`` outbox; a ``jsonl:`` input has none.
    """
    if state == "memory":
        return None
    if state is not None:
        if not state.startswith("sqlite:"):
            raise ConfigError(f"--state: must be memory or sqlite:PATH, got {state!r}")
        from worker.knowledge.sqlite import SqliteKnowledge

        return SqliteKnowledge(state.removeprefix("sqlite:"))
    scheme = source.partition(":")[0]
    if scheme == "sqlite":
        from worker.backends.sqlite.spool import parse_uri as parse_spool
        from worker.knowledge.sqlite import SqliteKnowledge

        return SqliteKnowledge(parse_spool(source).path)
    if scheme in ("redis", "rediss"):
        from worker.backends.redis.uri import parse_uri as parse_redis
        from worker.knowledge.redis import RedisKnowledge

        return RedisKnowledge(parse_redis(source))
    if scheme in ("postgresql", "postgres"):
        from worker.backends.postgres.uri import parse_uri as parse_pg
        from worker.knowledge.postgres import PostgresKnowledge

        return PostgresKnowledge(parse_pg(source))
    return None


async def forget_ids(source: str, keys: Sequence[str]) -> int | None:
    """Forget what ``source``'s own store knows of ``keys``; how many facts were dropped (None:
    the input keeps no knowledge of its own). Raises KnowledgeError if the store fails."""
    store = knowledge_store(source, None)
    if store is None or not keys:
        return None if store is None else 0
    async with store:
        return await store.forget(keys)
