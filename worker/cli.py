"""The ``contact-worker`` command: one subcommand per module, imported only when it runs.

Each subcommand's module gives ``configure_parser(parser)`` and ``main(args) -> int`` (or the
names :class:`Command` says). Only the module of the command being run is imported: ``run``
does not pay for the simulator's web server, the benchmarks' charts or the demo (about a
quarter of a second of CPU at every start).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from worker import __version__

# structlog imports rich, when it is installed, for pretty tracebacks on a console: 3.8 MB of
# memory and 60 ms of every start, which no worker command uses (its console logs print plain
# tracebacks, worker.obs.logging). Kept out while structlog is imported; the commands that
# draw tables (dlq show, bench) import rich themselves.
_RICH_KEPT_OUT = "rich" not in sys.modules
if _RICH_KEPT_OUT:
    sys.modules["rich"] = None  # type: ignore[assignment]
try:
    import structlog
finally:
    if _RICH_KEPT_OUT:
        del sys.modules["rich"]

from worker.errors import EXIT_AUTH, EXIT_FATAL, EXIT_OK, EXIT_USAGE, failure  # noqa: E402
from worker.obs import logging as obs_logging  # noqa: E402

# Re-exported: the exit codes and their mapping are defined in worker.errors.
__all__ = ["COMMANDS", "EXIT_AUTH", "EXIT_FATAL", "EXIT_OK", "EXIT_USAGE", "failure", "main"]


@dataclass(frozen=True)
class Command:
    """A subcommand: its help, and the module that configures and runs it."""

    name: str
    help: str
    description: str
    module: str
    configure: str = "configure_parser"
    main: str = "main"

    def attach(self, parser: argparse.ArgumentParser) -> None:
        """Import the command's module; add its options; make it the parser's ``func``."""
        module = importlib.import_module(self.module)
        getattr(module, self.configure)(parser)
        run: Callable[[argparse.Namespace], int] = getattr(module, self.main)
        parser.set_defaults(func=run)


COMMANDS: tuple[Command, ...] = (
    Command(
        "run",
        "sync changes from a source into the API",
        "Sync changes from a source into the API. Every option also reads its environment "
        "variable and the --config file (flag, then variable, then file, then default).",
        "worker.run_cli",
    ),
    Command(
        "config",
        "show the settings `run` would use and where each comes from",
        "Resolve the settings exactly as `run` does (flags, environment, --config file, "
        "defaults) and print each with its origin; secrets masked. Exit 2 if `run` would "
        "refuse them.",
        "worker.config_cli",
    ),
    Command(
        "demo",
        "run the worker end to end on a simulated API",
        "Generate a realistic change stream, start the simulated gateway in-process and run "
        "the real engine on it.",
        "worker.demo",
    ),
    Command(
        "simulate",
        "serve the simulated SMS Gateway API",
        "A faithful fake of PATCH /v1/contact for tests and benchmarks.",
        "worker.sim.cli",
    ),
    Command(
        "bench",
        "benchmark the worker against the baselines and the limits",
        "Run a benchmark scenario (a packaged one by name, or a TOML file): the simulated API "
        "and the worker in their own processes, the baselines beside them; write report.json, "
        "report.md and charts.",
        "worker.bench.bench_cli",
    ),
    Command(
        "plan",
        "predict drain time, requests and replicas (capacity model)",
        "The capacity model: from the API's rate limit and latency, the worker's settings and "
        "the change volume, predict throughput, requests, drain time and replicas.",
        "worker.bench.plan_cli",
    ),
    Command(
        "init",
        "create what an input needs (table and trigger, consumer group, spool)",
        "Create, idempotently, what an input needs: the outbox table, its trigger and "
        "dead-letter table; the Redis consumer group; the SQLite spool.",
        "worker.producer",
        configure="configure_init_parser",
        main="main_init",
    ),
    Command(
        "enqueue",
        "write JSONL changes from stdin to an input",
        "Read JSONL changes from standard input and write them to an input, the way any "
        "producer would (see docs/inputs/ for the wire formats).",
        "worker.producer",
        configure="configure_enqueue_parser",
        main="main_enqueue",
    ),
    Command(
        "dlq",
        "show dead letters; replay their changes into an input",
        "Look into a dead-letter store (the URI --dlq takes) and put the changes of dead "
        "letters back into an input once their cause is fixed.",
        "worker.deadletters.cli",
    ),
    Command(
        "state",
        "show or clear what the worker learnt about which IDs exist",
        "The ID knowledge an input's store holds (docs/id-knowledge.md): how many IDs are "
        "known to exist and known missing, or forget them all.",
        "worker.knowledge.cli",
    ),
)


def _fail(message: str, code: int) -> int:
    print(f"contact-worker: {message}", file=sys.stderr)
    return code


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line; with ``only``, the options of that command alone (the others are
    listed with their help, and not imported)."""
    parser = argparse.ArgumentParser(
        prog="contact-worker",
        description="Keep contacts in the SMS Gateway API (Smstools) in sync with upstream "
        "systems: coalesced, batched, per-contact ordered, nothing lost.",
    )
    parser.add_argument("--version", action="version", version=f"contact-worker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.help, description=command.description)
        if only is None or only == command.name:
            command.attach(sub)
    return parser


def _chosen(argv: Sequence[str]) -> str:
    """The subcommand named on the command line ("" if none: ``--help``, ``--version``)."""
    return next((arg for arg in argv if not arg.startswith("-")), "")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script: an error ends a command with one line on stderr and
    its exit code (:func:`failure`), never a traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args: Any = build_parser(_chosen(argv)).parse_args(argv)
    if not structlog.is_configured():
        # Logs before a command configures its own (a deprecated URI option's warning) go to
        # stderr: stdout is the commands' output (`config --json`, `dlq show --json`).
        obs_logging.configure_default()
    try:
        code: int = args.func(args)
    except (Exception, KeyboardInterrupt) as exc:
        code = _fail(*failure(exc))
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
