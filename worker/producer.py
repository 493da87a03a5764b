"""The producer side: ``contact-worker init --to URI`` and ``contact-worker enqueue --to URI``.

``init`` creates what an input needs, idempotently. ``enqueue`` reads JSONL from stdin and
writes each line to the input, so scripts (and tests) can feed any of them the same way.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import anyio

from worker.backends import producer_for


def configure_init_parser(p: argparse.ArgumentParser) -> None:
    """``init --to URI``."""
    p.add_argument("--to", required=True, metavar="URI", help="the input to prepare")


def configure_enqueue_parser(p: argparse.ArgumentParser) -> None:
    """``enqueue --to URI`` (JSONL on stdin)."""
    p.add_argument("--to", required=True, metavar="URI", help="the input to write to")


def main_init(args: argparse.Namespace) -> int:
    """Create the table, trigger, dead-letter table, consumer group... as the input needs."""
    init, _ = producer_for(args.to)
    anyio.run(init, args.to)
    print(f"ready: {args.to}", file=sys.stderr)
    return 0


def _lines() -> list[bytes]:
    return [line for line in sys.stdin.buffer.read().splitlines() if line.strip()]


def main_enqueue(args: argparse.Namespace) -> int:
    """Write each stdin line to the input; print how many."""
    _, enqueue = producer_for(args.to)
    lines = _lines()
    count: Any = anyio.run(enqueue, args.to, lines)
    print(f"enqueued {count:,} changes to {args.to}", file=sys.stderr)
    return 0
