"""What a store of dead letters holds: counts by reason and error, common details, time span.

Pure: a :class:`Tally` is fed the stored letters page by page (so memory does not grow with the
store, except for the distinct details) and answers with a :class:`Summary`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

NO_ERROR = "-"
"""The error column of a letter without an API error code (``invalid`` ones)."""

DETAIL_CHARS = 200
"""Details are cut to this length before counting: one long text per letter must not count
as a distinct detail each, nor hold much memory."""


@dataclass(frozen=True, slots=True)
class Stored:
    """One dead letter where a store keeps it."""

    key: str
    """Its place in the store: a line number, a stream entry ID, a row id."""
    letter: dict[str, Any] | None
    """The dead letter; None when the stored text is not a JSON object (a torn or foreign line)."""
    replayed: bool = False
    """Whether ``dlq replay`` already put its change back into an input."""


def change_of(letter: dict[str, Any]) -> dict[str, Any] | None:
    """The change a dead letter carries, or None when it has none to replay (``change: null``:
    the record was not even a JSON object; only ``raw`` holds what it was)."""
    change = letter.get("change")
    return change if isinstance(change, dict) and change else None


def reason_of(letter: dict[str, Any]) -> str:
    """The letter's reason as text (``?`` when missing)."""
    reason = letter.get("reason")
    return reason if isinstance(reason, str) and reason else "?"


def _error_of(letter: dict[str, Any]) -> str:
    error = letter.get("error")
    if error is None or error == "":
        return NO_ERROR
    return str(error)


def _detail_of(letter: dict[str, Any]) -> str:
    detail = letter.get("detail")
    if detail is None:
        return ""
    text = " ".join(str(detail).split())  # one line in a table
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 3] + "..."


@dataclass(slots=True)
class ReasonCount:
    """The letters of one reason."""

    letters: int = 0
    replayed: int = 0
    without_change: int = 0

    @property
    def waiting(self) -> int:
        """Not replayed yet and replayable (they carry a change)."""
        return self.letters - self.replayed - self.without_change


@dataclass(frozen=True, slots=True)
class Summary:
    """What ``dlq show`` reports."""

    store: str
    letters: int
    unreadable: int
    replayed: int
    waiting: int
    """Letters with a change, not replayed yet, of a reason replayed by default (not invalid)."""
    by_reason: dict[str, ReasonCount]
    by_error: dict[str, int]
    top_details: list[tuple[str, str, int]]
    """``(reason, detail, count)``, most common first."""
    oldest: str | None
    newest: str | None
    notes: tuple[str, ...] = ()
    """What the store noticed while reading: lines torn or not letters, and where."""

    def to_json(self) -> dict[str, Any]:
        """The summary as JSON-ready data (``dlq show --json``)."""
        return {
            "store": self.store,
            "letters": self.letters,
            "unreadable": self.unreadable,
            "replayed": self.replayed,
            "waiting": self.waiting,
            "by_reason": {
                reason: {
                    "letters": c.letters,
                    "replayed": c.replayed,
                    "without_change": c.without_change,
                }
                for reason, c in self.by_reason.items()
            },
            "by_error": self.by_error,
            "top_details": [
                {"reason": reason, "detail": detail, "count": count}
                for reason, detail, count in self.top_details
            ],
            "oldest": self.oldest,
            "newest": self.newest,
            "notes": list(self.notes),
        }


@dataclass(slots=True)
class Tally:
    """Counts dead letters as they are read."""

    letters: int = 0
    unreadable: int = 0
    by_reason: dict[str, ReasonCount] = field(default_factory=dict)
    by_error: Counter[str] = field(default_factory=Counter)
    details: Counter[tuple[str, str]] = field(default_factory=Counter)
    oldest: str | None = None
    newest: str | None = None

    def add(self, page: list[Stored]) -> None:
        """Count these letters."""
        for stored in page:
            self.letters += 1
            letter = stored.letter
            if letter is None:
                self.unreadable += 1
                continue
            reason = reason_of(letter)
            count = self.by_reason.get(reason)
            if count is None:
                count = self.by_reason[reason] = ReasonCount()
            count.letters += 1
            if stored.replayed:
                count.replayed += 1
            elif change_of(letter) is None:
                count.without_change += 1
            self.by_error[_error_of(letter)] += 1
            self.details[(reason, _detail_of(letter))] += 1
            at = letter.get("at")
            if isinstance(at, str) and at:
                # One fixed format (YYYY-MM-DDTHH:MM:SSZ): text order is time order.
                if self.oldest is None or at < self.oldest:
                    self.oldest = at
                if self.newest is None or at > self.newest:
                    self.newest = at

    def summary(self, store: str, *, top: int = 5, notes: tuple[str, ...] = ()) -> Summary:
        """The report so far, with the ``top`` most common details and the store's notes."""
        by_reason = dict(sorted(self.by_reason.items(), key=lambda kv: (-kv[1].letters, kv[0])))
        by_error = dict(sorted(self.by_error.items(), key=lambda kv: (-kv[1], kv[0])))
        details = sorted(self.details.items(), key=lambda kv: (-kv[1], kv[0]))[: max(top, 0)]
        return Summary(
            store=store,
            letters=self.letters,
            unreadable=self.unreadable,
            replayed=sum(c.replayed for c in self.by_reason.values()),
            waiting=sum(c.waiting for r, c in self.by_reason.items() if r != "invalid"),
            by_reason=by_reason,
            by_error=by_error,
            top_details=[(reason, detail, n) for (reason, detail), n in details],
            oldest=self.oldest,
            newest=self.newest,
            notes=notes,
        )
