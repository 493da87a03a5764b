"""The ``contact-worker dlq`` subcommand: ``show`` and ``replay`` the dead letters of a store."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable

import anyio
import orjson

from worker.backends import open_store
from worker.deadletters.display import console, print_replay, print_summary, print_warnings
from worker.deadletters.plan import Planner, parse_reasons
from worker.deadletters.replay import ReplayReport, replay
from worker.deadletters.store import DeadLetterStore
from worker.deadletters.summary import Summary, Tally
from worker.deadletters.targets import open_target
from worker.errors import EXIT_FATAL, EXIT_OK, EXIT_USAGE
from worker.knowledge.base import KnowledgeError, KnowledgeStore
from worker.knowledge.open import knowledge_store

REASONS = ("not_found", "rejected", "invalid")

URI_HELP = (
    "the dead letters, named as --dlq names them: jsonl:PATH, sqlite:PATH,"
    " redis://HOST:PORT/DB?stream=... (its <stream>:dead) or postgresql://...?table=..."
    " (its <table>_dead)"
)


def configure_parser(p: argparse.ArgumentParser) -> None:
    """``dlq show URI`` and ``dlq replay URI --to INPUT``."""
    actions = p.add_subparsers(dest="dlq_action", required=True, metavar="ACTION")
    show = actions.add_parser(
        "show",
        help="count dead letters by reason and error code; the common details",
        description="Count the dead letters of a store by reason and by error code, show the "
        "most common details, the oldest and newest, and how many were replayed.",
    )
    show.add_argument("uri", metavar="URI", help=URI_HELP)
    show.add_argument(
        "--top", type=int, default=5, metavar="N", help="most common details shown (5)"
    )
    show.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    show.set_defaults(dlq_func=main_show)

    again = actions.add_parser(
        "replay",
        help="put the changes of dead letters back into an input, once",
        description="Write the change of each dead letter not replayed yet to an input (once "
        "the cause is fixed, e.g. the missing contacts were created) and mark it replayed. "
        "Letters without a change (undecodable records) are skipped and counted.",
    )
    again.add_argument("uri", metavar="URI", help=URI_HELP)
    again.add_argument(
        "--to",
        required=True,
        metavar="INPUT",
        help="where the changes go: an input as `enqueue --to` takes it (sqlite:PATH,"
        " redis://..., postgresql://...) or jsonl:PATH (a file to run)",
    )
    again.add_argument(
        "--reason",
        action="append",
        metavar="R",
        help="replay only letters of these reasons (not_found, rejected, invalid); repeat it or"
        " give a comma list (default: all but invalid)",
    )
    again.add_argument("--limit", type=int, metavar="N", help="replay at most N letters")
    again.add_argument(
        "--dry-run", action="store_true", help="count what would be replayed; write nothing"
    )
    again.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    again.set_defaults(dlq_func=main_replay)


def _fail(message: str, code: int) -> int:
    print(f"contact-worker: {message}", file=sys.stderr)
    return code


async def collect(store: DeadLetterStore, *, top: int = 5) -> Summary:
    """Read every letter of the store (up to its end at open) and summarize them."""
    await store.open()
    try:
        tally = Tally()
        while page := await store.read():
            tally.add(page)
        notes = tuple(store.notes())
    finally:
        await store.close()
    return tally.summary(store.name, top=top, notes=notes)


def main_show(args: argparse.Namespace) -> int:
    """``dlq show URI``: 0, or 2 when the URI is bad or the store cannot be read."""
    if args.top < 0:
        return _fail("--top must be 0 or more", EXIT_USAGE)
    store = open_store(args.uri)  # its errors end the command in worker.cli.main
    summary = anyio.run(lambda: collect(store, top=args.top))
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(summary.to_json()) + b"\n")
    else:
        print_summary(console(), summary)
    return EXIT_OK


def main_replay(args: argparse.Namespace) -> int:
    """``dlq replay URI --to INPUT``: 0 when it ran to the end, 1 when it stopped early or
    another replay holds the store, 2 for a bad URI, option, store, or an input that fails
    before anything was written to it."""
    reasons = parse_reasons(args.reason)
    unknown = sorted((reasons or set()) - set(REASONS))
    if unknown:
        return _fail(
            f"--reason: unknown reason(s) {', '.join(unknown)} (known: {', '.join(REASONS)})",
            EXIT_USAGE,
        )
    if args.limit is not None and args.limit < 1:
        return _fail("--limit must be 1 or more", EXIT_USAGE)
    store = open_store(args.uri)  # its errors end the command in worker.cli.main
    target = open_target(args.to)
    if _same_file(args.uri, args.to):
        return _fail(
            f"--to {args.to} is the dead-letter file itself: replay into an input", EXIT_USAGE
        )
    planner = Planner(reasons, args.limit)
    knowledge = None if args.dry_run else knowledge_store(args.to, None)

    async def run() -> ReplayReport:
        if knowledge is None:
            return await replay(store, target, planner, dry_run=args.dry_run)
        async with Forgetting(knowledge) as forget:
            return await replay(store, target, planner, forget=forget)

    report = anyio.run(run)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report.to_json()) + b"\n")
    else:
        print_replay(console(), report)
    sys.stdout.flush()  # the warnings come after the report, also on a shared terminal
    print_warnings(console(stderr=True), report)
    return EXIT_FATAL if report.error else EXIT_OK


def main(args: argparse.Namespace) -> int:
    """Run the ``dlq`` action the command line chose."""
    code: int = args.dlq_func(args)
    return code


class Forgetting:
    """What the input's knowledge store holds of replayed contacts, dropped as they go back;
    opened at the first contacts to forget (after the input took a page: an input that cannot
    be reached stays the one error). A store that cannot be reached is a warning (a run may
    dead-letter them again from it until --suspect-ttl has passed, or `state clear`)."""

    def __init__(self, store: KnowledgeStore) -> None:
        self.store = store
        self.state = "closed"

    async def __aenter__(self) -> Callable[[list[str]], Awaitable[None]]:
        return self.forget

    async def forget(self, ids: list[str]) -> None:
        if not ids or self.state == "failed":
            return
        try:
            if self.state == "closed":
                self.state = "failed"
                await self.store.open()
                self.state = "open"
            await self.store.forget(ids)
        except KnowledgeError as exc:
            self.state = "failed"
            print(
                f"contact-worker: warning: could not forget the replayed contacts in {exc}: a"
                " run may dead-letter them again until --suspect-ttl has passed (or run"
                " `contact-worker state clear`)",
                file=sys.stderr,
            )

    async def __aexit__(self, *exc: object) -> None:
        await self.store.close()


def _same_file(store_uri: str, target_uri: str) -> bool:
    """Whether both URIs name the same existing ``jsonl:`` file (a ``sqlite:`` spool may replay
    into itself: its dead letters and its input are two tables)."""
    paths = []
    for uri in (store_uri, target_uri):
        scheme, _, rest = uri.partition(":")
        if scheme != "jsonl":
            return False
        paths.append(rest.split("?", 1)[0])
    try:
        return os.path.samefile(paths[0], paths[1])
    except OSError:
        return False
