"""Which dead letters a replay takes, and why it leaves the others (pure).

A letter is replayed when it carries a change, was not replayed before, and its reason is one
asked for: by default every reason but ``invalid`` (an invalid change fails validation again in
the same way; ask for ``--reason invalid`` explicitly, e.g. after an upgrade that accepts it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from worker.deadletters.summary import Stored, change_of, reason_of

NOT_BY_DEFAULT = frozenset({"invalid"})
"""Reasons replayed only when ``--reason`` names them."""


def parse_reasons(values: Iterable[str] | None) -> frozenset[str] | None:
    """``--reason`` values (repeated, or comma lists) as a set; None when none were given."""
    if not values:
        return None
    reasons = {part.strip() for value in values for part in value.split(",")}
    reasons.discard("")
    return frozenset(reasons) or None


@dataclass(slots=True)
class ReplayCounts:
    """What a replay did and left, by reason."""

    replayed: Counter[str] = field(default_factory=Counter)
    already_replayed: Counter[str] = field(default_factory=Counter)
    without_change: Counter[str] = field(default_factory=Counter)
    """Letters with ``change: null``: nothing to replay."""
    not_asked: Counter[str] = field(default_factory=Counter)
    """Letters of a reason not replayed (``--reason``, or ``invalid`` by default)."""
    over_limit: Counter[str] = field(default_factory=Counter)
    """Letters left because ``--limit`` was reached."""
    unreadable: int = 0

    def to_json(self) -> dict[str, Any]:
        """The counts as JSON-ready data."""
        return {
            "replayed": dict(self.replayed),
            "already_replayed": dict(self.already_replayed),
            "without_change": dict(self.without_change),
            "not_asked": dict(self.not_asked),
            "over_limit": dict(self.over_limit),
            "unreadable": self.unreadable,
        }


@dataclass(frozen=True, slots=True)
class Chosen:
    """One letter to replay: its place in the store, its reason, the change as JSON text."""

    key: str
    reason: str
    line: bytes


class Planner:
    """Chooses, page by page, the letters to replay; counts the ones it leaves."""

    def __init__(self, reasons: frozenset[str] | None = None, limit: int | None = None) -> None:
        self.reasons = reasons
        self.limit = limit
        self.counts = ReplayCounts()
        self.chosen = 0

    def wants(self, reason: str) -> bool:
        """Whether letters of this reason are replayed."""
        if self.reasons is None:
            return reason not in NOT_BY_DEFAULT
        return reason in self.reasons

    def choose(self, page: list[Stored], encode: Callable[[dict[str, Any]], bytes]) -> list[Chosen]:
        """The letters of this page to replay, in store order; ``encode`` turns a change into
        its JSON text (``orjson.dumps``)."""
        counts = self.counts
        chosen: list[Chosen] = []
        for stored in page:
            letter = stored.letter
            if letter is None:
                counts.unreadable += 1
                continue
            reason = reason_of(letter)
            change = change_of(letter)
            if stored.replayed:
                counts.already_replayed[reason] += 1
            elif change is None:
                counts.without_change[reason] += 1
            elif not self.wants(reason):
                counts.not_asked[reason] += 1
            elif self.limit is not None and self.chosen >= self.limit:
                counts.over_limit[reason] += 1
            else:
                self.chosen += 1
                chosen.append(Chosen(stored.key, reason, encode(change)))
        return chosen
