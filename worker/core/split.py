"""Isolation plans: how a refused batch is split until its culprits stand alone (DESIGN 4).

A batch refused with 404 or a batch-level 400 is *known bad*: at least one change in it is a
culprit. It is halved; the first half is sent and the second is held back. If the first half is
applied, the culprit must be in the second half, which is then split straight away instead of
being sent whole (a lone entry there is the culprit, with no request spent). If the first half
fails too, the second half proves nothing and is sent as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from worker.core.batch import Batch, Purpose
from worker.core.classify import Verdict
from worker.core.coalesce import Entry


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry that will never be applied, with what the API (or we) said about it."""

    entry: Entry
    reason: str
    status: int | None
    error: str | None
    detail: str | None


def culprit(entry: Entry, failure: Verdict) -> DeadLetter:
    """The dead letter for a lone entry found failing."""
    return DeadLetter(
        entry, failure.reason or "rejected", failure.status, failure.error, failure.detail
    )


def split_known_bad(
    entries: list[Entry],
    failure: Verdict,
    number: Callable[[], int],
    exists: Callable[[str], bool] | None = None,
) -> Batch | DeadLetter:
    """Plan for entries known to hold a culprit: the culprit itself, or a first half to send.

    ``exists``: which IDs are known to exist. They almost never hold the culprit, so the half
    is taken of the others (fresh first, as groups are packed): a fresh group topped up with
    known IDs costs the search of the fresh ones, not of the whole batch.
    """
    if len(entries) == 1:
        return culprit(entries[0], failure)
    middle = len(entries) // 2
    if exists is not None:
        fresh = 0
        while fresh < len(entries) and not exists(entries[fresh].key):
            fresh += 1
        if 0 < fresh < len(entries):
            middle = max(1, fresh // 2)
    second = Batch(entries[middle:], number(), Purpose.ISOLATE, failure=failure)
    return Batch(entries[:middle], number(), Purpose.ISOLATE, failure=failure, held=second)


def release_held(batch: Batch) -> Batch | None:
    """The held half of ``batch``, now to be sent as it is (nothing was learnt about it)."""
    held, batch.held = batch.held, None
    return held


def halves(
    batch: Batch, number: Callable[[], int], purpose: Purpose = Purpose.SHRINK
) -> list[Batch]:
    """Both halves of a batch, both to be sent: refused as too large, or refused with an
    answer too doubtful to infer anything from."""
    middle = len(batch.entries) // 2
    return [
        Batch(batch.entries[:middle], number(), purpose),
        Batch(batch.entries[middle:], number(), purpose),
    ]
