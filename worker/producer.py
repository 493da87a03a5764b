"""The producer side: ``contact-worker init --to URI`` and ``contact-worker enqueue --to URI``.

``init`` creates what an input needs, idempotently. ``enqueue`` reads JSONL from stdin and
writes each line to the input, so scripts (and tests) can feed any of them the same way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio

from worker.config import ConfigError

Init = Callable[[str], Awaitable[None]]
Enqueue = Callable[[str, Iterable[bytes]], Awaitable[int]]


def _backend(uri: str) -> tuple[Init, Enqueue]:
    scheme = uri.partition(":")[0]
    if scheme in ("redis", "rediss"):
        from worker.sources import redis_enqueue

        return redis_enqueue.init, redis_enqueue.enqueue
    if scheme in ("postgresql", "postgres"):
        from worker.sources import pg_enqueue

        return pg_enqueue.init, pg_enqueue.enqueue
    if scheme == "sqlite":
        from worker.sources import sqlite_spool

        return sqlite_spool.init, sqlite_spool.enqueue
    raise ConfigError(
        f"unsupported input {uri!r}: use sqlite:PATH, redis://HOST:PORT/DB or postgresql://..."
    )


def configure_init_parser(p: argparse.ArgumentParser) -> None:
    """``init --to URI``."""
    p.add_argument("--to", required=True, metavar="URI", help="the input to prepare")


def configure_enqueue_parser(p: argparse.ArgumentParser) -> None:
    """``enqueue --to URI`` (JSONL on stdin)."""
    p.add_argument("--to", required=True, metavar="URI", help="the input to write to")


def main_init(args: argparse.Namespace) -> int:
    """Create the table, trigger, dead-letter table, consumer group... as the input needs."""
    init, _ = _backend(args.to)
    anyio.run(init, args.to)
    print(f"ready: {args.to}", file=sys.stderr)
    return 0


def _lines() -> list[bytes]:
    return [line for line in sys.stdin.buffer.read().splitlines() if line.strip()]


def main_enqueue(args: argparse.Namespace) -> int:
    """Write each stdin line to the input; print how many."""
    _, enqueue = _backend(args.to)
    lines = _lines()
    count: Any = anyio.run(enqueue, args.to, lines)
    print(f"enqueued {count:,} changes to {args.to}", file=sys.stderr)
    return 0
