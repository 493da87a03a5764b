"""``contact-worker state show|clear``: the ID knowledge an input's store holds."""

from __future__ import annotations

import argparse
import sys

import anyio
import orjson

from worker.errors import EXIT_FATAL, EXIT_OK, ConfigError
from worker.knowledge.base import KnowledgeError, KnowledgeStore
from worker.knowledge.open import knowledge_store

SOURCE_HELP = (
    "the input, as `run --source` names it (its store: the sqlite: spool's table, the redis://"
    " stream's sorted sets, the postgresql:// outbox's <table>_ids)"
)


def configure_parser(p: argparse.ArgumentParser) -> None:
    """``state show SOURCE`` and ``state clear SOURCE``, each with ``--state``."""
    actions = p.add_subparsers(dest="state_action", required=True, metavar="ACTION")
    for name, help_ in (
        ("show", "how many IDs are known to exist and known missing, and where"),
        ("clear", "forget every ID the store knows (the next run learns them again)"),
    ):
        action = actions.add_parser(name, help=help_, description=help_[0].upper() + help_[1:])
        action.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
        action.add_argument("--state", metavar="URI", help="sqlite:PATH, as `run --state` names it")
        action.add_argument("--json", action="store_true", help="one JSON object, for scripts")
        action.set_defaults(state_action=name)


def main(args: argparse.Namespace) -> int:
    """Open the store, show or clear it; exit 1 if it cannot be reached."""
    store = knowledge_store(args.source, args.state)
    if store is None:
        raise ConfigError(
            f"{args.source!r} keeps ID knowledge in memory only: name a file with --state"
            " sqlite:PATH"
        )
    try:
        found = anyio.run(_act, store, args.state_action)
    except KnowledgeError as exc:
        print(f"contact-worker: {exc}", file=sys.stderr)
        return EXIT_FATAL
    out = {"store": store.display, **found}
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(out) + b"\n")
    elif args.state_action == "clear":
        print(f"{store.display}: forgot {found['cleared']} IDs")
    else:
        exists, missing = found["exists"], found["missing"]
        print(f"{store.display}: {exists} IDs known to exist, {missing} known missing")
    return EXIT_OK


async def _act(store: KnowledgeStore, action: str) -> dict[str, int]:
    async with store:
        if action == "clear":
            return {"cleared": await store.clear()}
        counts = await store.counts()
        return {"exists": counts.exists, "missing": counts.missing}
