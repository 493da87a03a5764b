"""Batches: the requests the engine sends, their bodies, and when the batcher flushes."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import msgspec

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
    riders: int = 0
    """How many trailing entries are riders: IDs a search step carries besides the ones it
    searches (its core), so that its request is not half empty (``worker.core.split``)."""
    no_riders: bool = False
    """A search in the riders of an earlier step: it takes no riders of its own, so that
    every search ends within its bound (``worker.core.grouptest.search_requests``)."""
    abandoned_at: float | None = None
    """When a send of this batch was last given up without an answer (it may still be
    applied by the API): its IDs are fenced from newer values for a grace period after."""
    same_answers: int = 0
    """How many times in a row ``last_answer`` came for this (lone) batch."""
    last_answer: tuple[int | None, str | None] | None = None
    """The last (status, error code) with an undocumented code, while confirming it."""
    encoded: bytes | None = field(default=None, repr=False)
    """The body, once encoded (by :func:`fill`, or by the first :meth:`body`)."""

    def body(self) -> bytes:
        """The JSON array to PATCH, encoded once (an entry in flight never changes)."""
        if self.encoded is None:
            self.encoded = _array_of(self.entries)
        return self.encoded

    @property
    def core(self) -> list[Entry]:
        """The entries the search step searches: all of them but its riders."""
        return self.entries[: len(self.entries) - self.riders]

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


def pack(entries: list[Entry], max_bytes: int) -> tuple[list[Entry], bytes]:
    """The longest prefix of ``entries`` whose body is at most ``max_bytes``, and that body,
    encoded in one call (the array at once; entry by entry only when it is over). One entry
    always goes, however large: the API is the judge of what it accepts (413 makes it a
    culprit)."""
    body = _array_of(entries)
    if len(entries) <= 1 or len(body) <= max_bytes:
        return entries, body
    parts = _encoded(entries)
    size, keep = 1, 0  # the brackets, less the first comma that is not written
    for part in parts:
        grown = size + len(part) + 1
        if keep and grown > max_bytes:
            break
        keep, size = keep + 1, grown
    return entries[:keep], _array(parts[:keep])


def _array_of(entries: list[Entry]) -> bytes:
    """The JSON array of the entries' objects, in one call (a body held encoded goes in as
    it is)."""
    raw = msgspec.Raw
    return msgspec.json.encode(
        [body if type(body := entry.body) is not bytes else raw(body) for entry in entries]
    )


def _encoded(entries: list[Entry]) -> list[bytes]:
    """Each entry's object as JSON (a body held encoded as it is)."""
    encode = msgspec.json.encode  # the same bytes as orjson.dumps, without its 4 KiB buffer
    return [body if type(body := entry.body) is bytes else encode(body) for entry in entries]


def _array(parts: list[bytes]) -> bytes:
    return b"[" + b",".join(parts) + b"]"
