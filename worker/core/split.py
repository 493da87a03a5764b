"""Isolation plans: how a refused batch is split until its culprits stand alone (DESIGN 4).

A batch refused with 404 or a batch-level 400 is *known bad*: at least one change in it is a
culprit. It is halved; the first half is sent and the second is held back. If the first half is
applied, the culprit must be in the second half, which is then split straight away instead of
being sent whole (a lone entry there is the culprit, with no request spent). If the first half
fails too, the second half proves nothing and is sent as it is.

Riders. A search step may carry *riders* besides the entries it searches (its *core*): IDs
from the pools, so that its request is not half empty (the scheduler adds them as it hands the
step out, the batch counts them in :attr:`Batch.riders`). A refused step with riders is known
to hold a culprit somewhere in core and riders together; it is split on its core, the riders
(its *pad*) staying with the held part:

* core of 2 or more: the first half of the core is sent (with riders of its own); the held
  part is the other half of the core and the pad. Applied: the culprit is in the held part,
  which is known bad. Refused: the held part proves nothing, and the search goes on in the
  refused step (its core and its own riders).
* core of 1 and a pad: the pad is sent (without riders) and the core's entry held. Applied:
  that entry is the culprit, inferred as when the second half of a halving is one entry.
  Refused: the entry proves nothing, and the search goes on in the pad, without riders (so
  that every search ends within its bound, ``worker.core.grouptest.search_requests``).
* one entry in all: the culprit.

An entry is dead-lettered only on a lone answer or when every other entry of a refused set
was applied: riders change what a request carries, never what is inferred.
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
    *,
    riders: int = 0,
    no_riders: bool = False,
) -> Batch | DeadLetter:
    """Plan for entries known to hold a culprit: the culprit itself, or a first part to send.

    ``riders``: how many trailing entries are the pad (the riders of the refused step); the
    rest is the core, halved (a core of one: the pad is sent, the entry held).
    ``no_riders``: the parts take no riders (a search in a pad).

    ``exists``: which IDs are known to exist. They almost never hold the culprit, so the half
    is taken of the others (fresh first, as groups are packed): a fresh group topped up with
    known IDs costs the search of the fresh ones, not of the whole batch.
    """
    if len(entries) == 1:
        return culprit(entries[0], failure)
    riders = max(0, min(riders, len(entries) - 1))
    size = len(entries) - riders
    core, pad = entries[:size], entries[size:]
    if size == 1:
        # The pad is sent: applied, the core's entry is the culprit (inferred).
        held = Batch(core, number(), Purpose.ISOLATE, failure=failure)
        return Batch(pad, number(), Purpose.ISOLATE, failure=failure, held=held, no_riders=True)
    middle = size // 2
    if exists is not None:
        fresh = 0
        while fresh < size and not exists(core[fresh].key):
            fresh += 1
        if 0 < fresh < size:
            middle = max(1, fresh // 2)
    second = Batch(
        core[middle:] + pad,
        number(),
        Purpose.ISOLATE,
        failure=failure,
        riders=len(pad),
        no_riders=no_riders,
    )
    return Batch(
        core[:middle], number(), Purpose.ISOLATE, failure=failure, held=second, no_riders=no_riders
    )


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
