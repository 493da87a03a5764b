"""How ``dlq show`` and ``dlq replay`` print: rich tables for people (``--json`` is for scripts)."""

from __future__ import annotations

import sys
from collections import Counter

from rich.console import Console
from rich.table import Table

from worker.deadletters.plan import NOT_BY_DEFAULT
from worker.deadletters.replay import ORDER_WARNING, ReplayReport
from worker.deadletters.summary import Summary


def _n(value: int) -> str:
    return f"{value:,}"


TEXT_COLUMNS = frozenset({"reason", "error", "detail"})
"""Left-aligned; every other column holds counts."""


def _table(*columns: str, title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left", box=None, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column, justify="left" if column in TEXT_COLUMNS else "right")
    return table


def console(*, stderr: bool = False) -> Console:
    """A console that does not wrap lines; 120 columns when not on a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 120
    return Console(stderr=stderr, soft_wrap=True, width=width)


def print_summary(console: Console, summary: Summary) -> None:
    """``dlq show``: totals, then letters by reason, by error code, and the common details."""
    console.print(f"[bold]Dead letters in {summary.store}[/bold]", highlight=False)
    if not summary.letters:
        console.print("none")
        _print_notes(console, summary)
        return
    span = f", {summary.oldest} .. {summary.newest}" if summary.oldest else ""
    console.print(
        f"{_n(summary.letters)} letters{span}; {_n(summary.replayed)} already replayed;"
        f" {_n(summary.waiting)} can be replayed",
        highlight=False,
    )
    if summary.unreadable:
        console.print(f"{_n(summary.unreadable)} unreadable (not a JSON object)", highlight=False)
    _print_notes(console, summary)
    console.print()
    reasons = _table("reason", "letters", "replayed", "no change")
    for reason, count in summary.by_reason.items():
        reasons.add_row(reason, _n(count.letters), _n(count.replayed), _n(count.without_change))
    console.print(reasons)
    console.print()
    errors = _table("error", "letters")
    for error, n in summary.by_error.items():
        errors.add_row(error, _n(n))
    console.print(errors)
    if summary.top_details:
        console.print()
        details = _table("letters", "reason", "detail", title="most common details")
        for reason, detail, n in summary.top_details:
            details.add_row(_n(n), reason, detail or "-")
        console.print(details)


def _print_notes(console: Console, summary: Summary) -> None:
    for note in summary.notes:
        console.print(f"note: {note}", highlight=False)


def _reasons(counts: Counter[str]) -> str:
    return ", ".join(f"{_n(n)} {reason}" for reason, n in sorted(counts.items()))


def print_replay(console: Console, report: ReplayReport) -> None:
    """``dlq replay``: what was replayed, by reason, and what was left and why."""
    counts = report.counts
    verb = "would replay" if report.dry_run else "replayed"
    how = " (written and marked in one transaction)" if report.atomic else ""
    console.print(
        f"{verb} {_n(report.replayed)} dead letters from {report.store} into {report.target}{how}",
        highlight=False,
    )
    if counts.replayed:
        table = _table("reason", verb)
        for reason, n in sorted(counts.replayed.items()):
            table.add_row(reason, _n(n))
        console.print(table)
    left = [
        (counts.already_replayed, "already replayed"),
        (counts.without_change, "no change (change: null, only raw): cannot be replayed"),
        (counts.not_asked, "reason not asked for"),
        (counts.over_limit, "over --limit"),
    ]
    for counter, why in left:
        if counter:
            console.print(f"skipped, {why}: {_reasons(counter)}", highlight=False)
    if counts.unreadable:
        console.print(f"skipped, unreadable: {_n(counts.unreadable)}", highlight=False)
    if set(counts.not_asked) & NOT_BY_DEFAULT:
        console.print(
            "(invalid letters are replayed only with --reason invalid: they fail validation"
            " again unless the worker changed)",
            highlight=False,
        )


def print_warnings(console: Console, report: ReplayReport) -> None:
    """The order caveat, and what an early stop left behind (on stderr)."""
    if report.replayed:
        console.print(f"warning: {ORDER_WARNING}", highlight=False)
    if report.error:
        console.print(f"stopped early: {report.error}", highlight=False)
    if report.knowledge_error:
        console.print(
            f"the input's ID knowledge could not forget the IDs replayed: {report.knowledge_error};"
            " a worker dead-letters them again at once while it remembers them missing"
            " (--suspect-ttl), or until `contact-worker state clear`",
            highlight=False,
        )
    if report.unmarked:
        console.print(
            f"{_n(report.unmarked)} changes were written to {report.target} but not marked:"
            " the next replay sends them again (harmless: PATCH is idempotent)",
            highlight=False,
        )
