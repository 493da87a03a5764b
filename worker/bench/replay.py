"""Replaying an input through the worker's pure core against a pure model of the API.

No network, no clock: the real :class:`worker.core.scheduler.Scheduler` gets the input's
changes as fast as it has room for them (a reader always ahead of the senders, as under a rate
limit), and each request it hands out is answered at once: 404 if it holds an unknown ID, else
204. That gives the requests the worker's decisions need for this very input, free of timing;
and, for comparison, what plain halving would have spent on the same contacts in full batches
of ``B`` (both halves of a refused batch sent; each distinct ID once, in the order it first
came), counted with :func:`worker.bench.bounds.halving_requests`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from worker.bench.bounds import PLAIN, halving_requests
from worker.core.batch import Batch, BatchLimits, Purpose
from worker.core.change import Change, decode
from worker.core.classify import Action, Verdict
from worker.core.scheduler import DEFAULT_MAX_WAITING, Scheduler, SchedulerSettings

APPLIED = Verdict(Action.APPLIED, 204)
NOT_FOUND = Verdict(Action.ISOLATE, 404, "404", "contact not found", reason="not_found")


@dataclass(frozen=True)
class Replay:
    """What the core did with one input."""

    requests: int
    new_batches: int
    refused_batches: int
    isolation_requests: int
    known_missing: int
    """Changes dead-lettered without a request: their IDs were known missing."""
    plain_halving_requests: int
    """Plain halving of the distinct IDs in full batches of B, in the order they first came."""
    contacts: int

    @property
    def per_contact(self) -> float:
        """The core's requests per distinct ID."""
        return self.requests / self.contacts if self.contacts else 0.0

    @property
    def plain_per_contact(self) -> float:
        """Plain halving's requests per distinct ID."""
        return self.plain_halving_requests / self.contacts if self.contacts else 0.0

    def to_json(self) -> dict[str, Any]:
        """Plain data with the per-contact figures."""
        return asdict(self) | {
            "per_contact": self.per_contact,
            "plain_per_contact": self.plain_per_contact,
        }


def replay(
    lines: Iterable[bytes],
    is_known: Callable[[str], bool],
    *,
    batch_size: int,
    max_waiting: int = DEFAULT_MAX_WAITING,
) -> Replay:
    """Run the input through the scheduler, one request at a time, answered at once."""
    limits = BatchLimits(max_items=batch_size, max_bytes=1 << 30, linger_s=0.0)
    scheduler = Scheduler(SchedulerSettings(limits=limits, max_waiting=max_waiting), lambda: 0.5)
    changes = (item for n, line in enumerate(lines) if type(item := decode(line, n)) is Change)
    distinct: set[str] = set()
    requests = new = refused = 0
    order: list[str] = []
    pending = True
    while True:
        while pending and scheduler.has_room:
            change = next(changes, None)
            if change is None:
                pending = False
                scheduler.draining = True
                break
            if change.key not in distinct:
                distinct.add(change.key)
                order.append(change.key)
            scheduler.add(change, 0.0)
        batch = scheduler.next_batch(0.0)
        if not isinstance(batch, Batch):
            if scheduler.settle_due(0.0) is not None:  # lone 404s written, as the engine does
                continue
            if not pending and scheduler.idle:
                break
            if not scheduler.has_room:
                raise RuntimeError("replay stalled: the scheduler is full and sends nothing")
            continue  # room was made: read on
        requests += 1
        unknown = [not is_known(key) for key in batch.keys]
        if batch.purpose is Purpose.NEW:
            new += 1
            refused += any(unknown)
        scheduler.resolve(batch, NOT_FOUND if any(unknown) else APPLIED, 0.0)
    flags = [not is_known(key) for key in order]
    plain = sum(
        halving_requests(flags[start : start + batch_size], PLAIN)
        for start in range(0, len(flags), batch_size)
    )
    return Replay(
        requests=requests,
        new_batches=new,
        refused_batches=refused,
        isolation_requests=requests - new,
        known_missing=scheduler.stats.known_missing,
        plain_halving_requests=plain,
        contacts=len(distinct),
    )
