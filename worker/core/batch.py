"""Batches: the requests the engine sends, their bodies, and when the batcher flushes."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import orjson

from worker.core.classify import Verdict
from worker.core.coalesce import Coalescer, Entry


class Purpose(enum.Enum):
    """Why a request is sent: new work, or work spent on finding culprits."""

    NEW = "new"
    ISOLATE = "isolate"
    """A part of a batch refused with 404/400, sent to find the culprits."""
    SUSPECT = "suspect"
    """An ID recently found missing, sent alone so it cannot poison a batch."""
    SHRINK = "shrink"
    """A half of a batch refused with 413 as too large."""


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """The batcher's settings."""

    max_items: int = 100
    max_bytes: int = 1 << 20
    linger_s: float = 0.2


@dataclass(slots=True, eq=False)
class Batch:
    """One request's worth of entries, each holding a different ID."""

    entries: list[Entry]
    number: int
    purpose: Purpose = Purpose.NEW
    attempt: int = 0
    """Transient failures so far."""
    not_before: float = 0.0
    failure: Verdict | None = None
    """Why the batch this one was split from failed (for culprits found by inference)."""
    held: Batch | None = field(default=None, repr=False)
    """The other half of a failed batch, sent (or split) only once this one is resolved."""
    abandoned_at: float | None = None
    """When a send of this batch was last given up without an answer (it may still be
    applied by the API): its IDs are fenced from newer values for a grace period after."""
    same_answers: int = 0
    """How many times in a row ``last_answer`` came for this (lone) batch."""
    last_answer: tuple[int | None, str | None] | None = None
    """The last (status, error code) with an undocumented code, while confirming it."""

    def body(self) -> bytes:
        """The JSON array to PATCH."""
        parts = []
        for entry in self.entries:
            if entry.encoded is None:
                entry.encoded = orjson.dumps(entry.body)
            parts.append(entry.encoded)
        return b"[" + b",".join(parts) + b"]"

    @property
    def keys(self) -> list[str]:
        """The IDs in this batch, in order."""
        return [entry.key for entry in self.entries]


def flush_due(
    coalescer: Coalescer, limits: BatchLimits, ceiling: int, now: float, draining: bool
) -> bool | float | None:
    """True to flush now; else the time the oldest ready change will have lingered enough.

    None when nothing is ready.
    """
    oldest = coalescer.peek()
    if oldest is None:
        return None
    if draining or coalescer.ready_count >= ceiling:
        return True
    due = oldest.since + limits.linger_s
    return True if due <= now else due


def fill(coalescer: Coalescer, ceiling: int, max_bytes: int) -> tuple[list[Entry], int]:
    """Take ready entries, oldest first, up to ``ceiling`` entries and ``max_bytes`` of body.

    Returns the entries and the body size. One entry always goes, however large: the API is
    the judge of what it accepts (413 makes it a culprit).
    """
    taken: list[Entry] = []
    size = 1  # the brackets, less the first comma that is not written
    while len(taken) < ceiling:
        entry = coalescer.peek()
        if entry is None:
            break
        if entry.encoded is None:
            entry.encoded = orjson.dumps(entry.body)
        grown = size + len(entry.encoded) + 1
        if taken and grown > max_bytes:
            break
        taken.append(coalescer.pop())
        size = grown
    return taken, size
