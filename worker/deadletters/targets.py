"""Where ``dlq replay --to URI`` puts changes back: any input ``contact-worker enqueue --to``
writes (the same writers, so a partitioned input gets each change in its contact's partition),
or a ``jsonl:PATH`` file to run with ``contact-worker run --source jsonl:PATH``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable

import anyio

from worker.config import ConfigError, redact_uri

Enqueue = Callable[[str, Iterable[bytes]], Awaitable[int]]


class Target:
    """An input to write changes to, its URI checked."""

    def __init__(self, uri: str, display: str, enqueue: Enqueue) -> None:
        self.uri = uri
        self.display = display
        self._enqueue = enqueue

    async def write(self, lines: list[bytes]) -> int:
        """Write these changes (JSON text, one per element) in order; durable when it returns.
        The count written. SourceError (or OSError for a file) if the input failed."""
        return await self._enqueue(self.uri, lines)


async def _append_jsonl(uri: str, lines: Iterable[bytes]) -> int:
    path = uri.partition(":")[2]
    data = [line + b"\n" for line in lines]
    count = len(data)

    def append() -> None:
        created = not os.path.exists(path)
        with open(path, "ab+") as f:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a last line cut short: never glue a change onto it
                    data.insert(0, b"\n")
            f.write(b"".join(data))
            f.flush()
            os.fsync(f.fileno())
        if created:  # the new file's name must survive a power cut too, like the marks
            fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    await anyio.to_thread.run_sync(append)
    return count


def open_target(uri: str) -> Target:
    """The input a ``--to`` URI names, checked (not connected); ConfigError if it is bad."""
    scheme, sep, rest = uri.partition(":")
    if scheme == "jsonl" and sep and rest and rest != "-":
        return Target(uri, f"jsonl:{rest}", _append_jsonl)
    if scheme in ("redis", "rediss"):
        from worker.sources import redis_enqueue
        from worker.sources.redis_streams import parse_uri as redis_uri

        address = redis_uri(uri)
        streams = address.stream
        if address.partitions > 1:
            streams = f"{address.stream}:0..{address.partitions - 1}"
        return Target(uri, f"redis {address.display} {streams}", redis_enqueue.enqueue)
    if scheme in ("postgresql", "postgres"):
        from worker.sources import pg_enqueue
        from worker.sources.pg_outbox import parse_uri as pg_uri

        target = pg_uri(uri)
        return Target(uri, f"postgresql {target.display} {target.outbox}", pg_enqueue.enqueue)
    if scheme == "sqlite":
        from worker.sources import sqlite_spool

        options = sqlite_spool.parse_uri(uri)
        return Target(uri, f"sqlite:{options.path} changes", sqlite_spool.enqueue)
    raise ConfigError(
        f"unsupported input {redact_uri(uri)!r} for --to: use sqlite:PATH, redis://..., postgresql://..."
        " (as `contact-worker enqueue --to` takes) or jsonl:PATH (a file to run)"
    )
