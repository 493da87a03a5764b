"""``contact-worker config``: the settings ``run`` would use, and where each one came from."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from worker.backends import open_sink, open_source
from worker.config import Choice, Origin, Resolution, Secret, add_options, redact_uri
from worker.config_file import resolution
from worker.errors import EXIT_OK, EXIT_USAGE, ConfigError
from worker.knowledge.open import knowledge_store

MISSING_TEXT, INVALID_TEXT, NONE_TEXT = "(required, missing)", "(invalid)", "(none)"

DERIVED_TEXT = {"timeout_grace_s": "(twice request_timeout_s)"}
"""What an unset setting with a derived default stands for."""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The flags of ``run`` (so a user sees what ``run`` with them would use), and ``--json``."""
    add_options(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")


def shown(value: Any) -> Any:
    """A value as it may be shown: secrets masked, passwords in URIs redacted."""
    if isinstance(value, Secret):
        return "***"
    if isinstance(value, str):
        return redact_uri(value)
    return value


def value_text(choice: Choice) -> str:
    """The VALUE column: the shown value, or why there is none."""
    if choice.origin is Origin.MISSING:
        return MISSING_TEXT
    if choice.problem is not None:
        return INVALID_TEXT
    value = shown(choice.value)
    if value is None:
        return DERIVED_TEXT.get(choice.option.field, NONE_TEXT)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 200, not 200.0: as a user writes it
    return str(value)


def knowledge_text(result: Resolution) -> str | None:
    """Where ID knowledge lasts when ``state`` is not set: the input's own store, or memory."""
    values = {c.option.field: c.value for c in result.choices if c.problem is None}
    if values.get("state") is not None or not values.get("source"):
        return None
    try:
        store = knowledge_store(values["source"], None)
    except ConfigError:
        return None
    return f"(the input's store: {redact_uri(store.display)})" if store else "(memory only)"


def render_table(result: Resolution) -> str:
    """The file's name, then aligned columns SETTING, VALUE, FROM, one line per setting."""
    rows = [("SETTING", "VALUE", "FROM")]
    state = knowledge_text(result)
    rows += [
        (
            c.option.field,
            state if c.option.field == "state" and state else value_text(c),
            c.describe(),
        )
        for c in result.choices
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"configuration file: {result.config_file}"] if result.config_file else []
    lines += [
        f"{key:<{widths[0]}}  {value:<{widths[1]}}  {origin}".rstrip()
        for key, value, origin in rows
    ]
    return "\n".join(lines)


def render_json(result: Resolution) -> str:
    """``{"config_file", "settings": {KEY: {value, origin, where, problem}}, "problems"}``."""
    settings = {
        c.option.field: {
            "value": None if c.problem is not None else shown(c.value),
            "origin": str(c.origin),
            "where": c.where,
            "problem": c.problem,
        }
        for c in result.choices
    }
    state = knowledge_text(result)
    if state and "state" in settings:
        settings["state"]["store"] = state.removeprefix("(").removesuffix(")")
    data = {
        "config_file": result.config_file,
        "settings": settings,
        "problems": list(result.problems),
    }
    return json.dumps(data, indent=2)


def main(args: argparse.Namespace) -> int:
    """Print the effective settings; exit 2, naming every problem, if ``run`` would refuse them.

    A configuration file that cannot be read or has unknown keys raises ConfigError (exit 2
    without a table): there is no knowing what it meant to set.
    """
    result = resolution(args, os.environ)
    try:
        print(render_json(result) if args.json else render_table(result), flush=True)
    except BrokenPipeError:  # `contact-worker config | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    problems = list(result.problems) or _input_problems(result)
    if problems:
        print(f"contact-worker: {'; '.join(problems)}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _input_problems(result: Resolution) -> list[str]:
    """What ``run`` would refuse in the input and dead-letter URIs (parsed, not connected)."""
    try:
        settings = result.settings()
        open_source(settings.source, follow=settings.follow, checkpoint=settings.checkpoint)
        open_sink(settings.dlq)
    except ConfigError as exc:
        return [str(exc)]
    return []
