"""``dlq replay``: put the changes of dead letters back into an input, and mark them replayed.

Page by page, in the order the letters were written: the :class:`~worker.deadletters.plan.Planner`
chooses, the changes are written to the input, and only then are their letters marked. A crash
(or a lost connection) between the two leaves letters written and not marked: the next replay
sends them again. Replays are at-least-once, like everything else here; PATCH is idempotent.
Where the input lives in the store itself (a spool file's ``changes``, an outbox of the same
database) both happen in one transaction, and each letter is replayed exactly once.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from worker.backends.base import EnqueueStopped, SourceError
from worker.core.change import key_of
from worker.deadletters.plan import Planner, ReplayCounts
from worker.deadletters.store import PAGE, DeadLetterStore, StoreError
from worker.deadletters.targets import Target
from worker.knowledge.base import KnowledgeError
from worker.knowledge.open import forget_ids

ORDER_WARNING = (
    "a replayed change is sent as it was when it failed: if a newer change to the same contact"
    " was applied since, the replayed one overwrites those fields with older values"
)


def utc_now() -> str:
    """The time a page is marked, as the dead letters write it."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(slots=True)
class ReplayReport:
    """What a replay did (or, with ``--dry-run``, would do)."""

    store: str
    target: str
    dry_run: bool
    atomic: bool
    """Written and marked in one transaction (the input is in the store)."""
    counts: ReplayCounts = field(default_factory=ReplayCounts)
    error: str | None = None
    """What stopped the replay before the end, if anything."""
    unmarked: int = 0
    knowledge_forgotten: int | None = None
    """Facts the input's ID knowledge dropped for the IDs replayed ``not_found`` (None: the
    input keeps none), so that their changes are sent, not dead-lettered again at once."""
    knowledge_error: str | None = None
    """Changes written to the input whose letters could not be marked: sent again next time."""

    @property
    def replayed(self) -> int:
        """Letters replayed (or that would be, with ``--dry-run``)."""
        return sum(self.counts.replayed.values())

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (``dlq replay --json``)."""
        return {
            "store": self.store,
            "to": self.target,
            "dry_run": self.dry_run,
            "atomic": self.atomic,
            **self.counts.to_json(),
            "error": self.error,
            "unmarked": self.unmarked,
            "knowledge_forgotten": self.knowledge_forgotten,
            "knowledge_error": self.knowledge_error,
            "warning": ORDER_WARNING if self.replayed else None,
        }


async def replay(
    store: DeadLetterStore,
    target: Target,
    planner: Planner,
    *,
    dry_run: bool = False,
    page_size: int = PAGE,
    now: Callable[[], str] = utc_now,
) -> ReplayReport:
    """Replay what the planner chooses from ``store`` into ``target``.

    Raises StoreError (or StoreBusy) if the store cannot be opened, SourceError if the target
    fails before anything was written to it; a failure after that ends the replay early and is
    in the report's ``error``, with everything done until then.
    """
    await store.open(replay=not dry_run)
    try:
        atomic = not dry_run and store.holds_input(target.uri)
        report = ReplayReport(store.name, target.display, dry_run, atomic, planner.counts)
        replayed = report.counts.replayed
        missing: list[str] = []
        while True:
            try:
                page = await store.read(page_size)
            except StoreError as exc:
                report.error = str(exc)
                break
            if not page:
                break
            chosen = planner.choose(page, orjson.dumps)
            if not chosen:
                continue
            if dry_run:
                replayed.update(c.reason for c in chosen)
                continue
            keys = [c.key for c in chosen]
            lines = [c.line for c in chosen]
            if atomic:
                try:
                    await store.insert_and_mark(target.uri, keys, lines, now())
                except StoreError as exc:
                    report.error = str(exc)
                    break
            else:
                try:
                    await target.write(lines)
                except (SourceError, OSError) as exc:
                    if not report.replayed and not isinstance(exc, EnqueueStopped):
                        # Nothing done yet: an input that cannot be reached (or refuses the
                        # first write) is a setting to fix, like a store that cannot be opened.
                        raise SourceError(f"writing to {target.display}: {exc}") from exc
                    report.error = f"writing to {target.display}: {exc}"
                    break
                try:
                    await store.mark(keys, now())
                except StoreError as exc:
                    report.error = f"marking in {store.name}: {exc}"
                    report.unmarked = len(keys)
                    break
            replayed.update(c.reason for c in chosen)
            missing += [key for c in chosen if c.reason == "not_found" and (key := _id(c.line))]
        if missing:
            try:
                report.knowledge_forgotten = await forget_ids(target.uri, missing)
            except KnowledgeError as exc:
                report.knowledge_error = str(exc)
        return report
    finally:
        await store.close()


def _id(line: bytes) -> str | None:
    """The contact ID (its coalescing key) of a replayed change."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return key_of(obj.get("ID")) if type(obj) is dict else None
