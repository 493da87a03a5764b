"""The ``contact-worker`` command: run, demo, simulate."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import anyio
import structlog

from worker import __version__, producer
from worker.backends import open_sink, open_source
from worker.bench.bench_cli import configure_parser as configure_bench
from worker.bench.bench_cli import main as bench_main
from worker.bench.plan_cli import configure_parser as configure_plan
from worker.bench.plan_cli import main as plan_main
from worker.config import add_options
from worker.config_cli import configure_parser as configure_config
from worker.config_cli import main as config_main
from worker.config_file import resolve
from worker.deadletters.cli import configure_parser as configure_dlq
from worker.deadletters.cli import main as dlq_main
from worker.demo import configure_parser as configure_demo
from worker.demo import main as demo_main
from worker.engine import Ending
from worker.errors import EXIT_AUTH, EXIT_FATAL, EXIT_OK, EXIT_USAGE, WorkerError, failure
from worker.knowledge.cli import configure_parser as configure_state
from worker.knowledge.cli import main as state_main
from worker.obs import logging as obs_logging
from worker.run import EXIT_CODES, backend_options, run_worker, tune_gc
from worker.signals import SignalRouter
from worker.sim.cli import configure_parser as configure_simulate
from worker.sim.cli import main as simulate_main

# Re-exported: the exit codes and their mapping are defined in worker.errors.
__all__ = ["EXIT_AUTH", "EXIT_FATAL", "EXIT_OK", "EXIT_USAGE", "failure", "main"]


def _fail(message: str, code: int) -> int:
    print(f"contact-worker: {message}", file=sys.stderr)
    return code


def cmd_run(args: argparse.Namespace) -> int:
    """``contact-worker run``: SIGTERM and SIGINT are handled from its first line to the exit."""
    signals = SignalRouter()
    signals.install()
    try:
        return _run(args, signals)
    finally:
        signals.finish()


def _run(args: argparse.Namespace, signals: SignalRouter) -> int:
    """Resolve, open and run; an error that stops it goes to :func:`main` (one line, its exit
    code); a run that ended maps its ending to the exit code."""
    settings = resolve(args, os.environ)
    obs_logging.configure(settings.log_format, settings.log_level)  # before the URIs' warnings
    source = open_source(settings.source, follow=settings.follow, checkpoint=settings.checkpoint)
    sink = open_sink(settings.dlq)
    tune_gc()
    try:
        result = anyio.run(
            run_worker, settings, source, sink, signals, backend_options=backend_options()
        )
    except WorkerError:
        raise
    except Exception:  # unforeseen: its traceback in the log, one line on stderr (main)
        structlog.get_logger("worker").exception("fatal error")
        raise
    if result.message and result.ending in (Ending.AUTH, Ending.FATAL):
        print(f"contact-worker: {result.message}", file=sys.stderr)
    return EXIT_CODES[result.ending]


def cmd_simulate(args: argparse.Namespace) -> int:
    """``contact-worker simulate``."""
    return simulate_main(args)


def cmd_demo(args: argparse.Namespace) -> int:
    """``contact-worker demo``."""
    return demo_main(args)


def cmd_bench(args: argparse.Namespace) -> int:
    """``contact-worker bench``."""
    return bench_main(args)


def cmd_config(args: argparse.Namespace) -> int:
    """``contact-worker config``."""
    return config_main(args)


def cmd_plan(args: argparse.Namespace) -> int:
    """``contact-worker plan``."""
    return plan_main(args)


def cmd_dlq(args: argparse.Namespace) -> int:
    """``contact-worker dlq``."""
    return dlq_main(args)


def cmd_state(args: argparse.Namespace) -> int:
    """``contact-worker state``."""
    return state_main(args)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = argparse.ArgumentParser(
        prog="contact-worker",
        description="Keep contacts in the SMS Gateway API (Smstools) in sync with upstream "
        "systems: coalesced, batched, per-contact ordered, nothing lost.",
    )
    parser.add_argument("--version", action="version", version=f"contact-worker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="sync changes from a source into the API",
        description="Sync changes from a source into the API. Every "
        "option also reads its environment variable and the --config file "
        "(flag, then variable, then file, then default).",
    )
    add_options(run)
    run.set_defaults(func=cmd_run)

    config = commands.add_parser(
        "config",
        help="show the settings `run` would use and where each comes from",
        description="Resolve the settings exactly as `run` does (flags, environment, --config "
        "file, defaults) and print each with its origin; secrets masked. Exit 2 if `run` "
        "would refuse them.",
    )
    configure_config(config)
    config.set_defaults(func=cmd_config)

    demo = commands.add_parser(
        "demo",
        help="run the worker end to end on a simulated API",
        description="Generate a realistic change stream, start the "
        "simulated gateway in-process and run the real engine on it.",
    )
    configure_demo(demo)
    demo.set_defaults(func=cmd_demo)

    simulate = commands.add_parser(
        "simulate",
        help="serve the simulated SMS Gateway API",
        description="A faithful fake of PATCH /v1/contact for tests and benchmarks.",
    )
    configure_simulate(simulate)
    simulate.set_defaults(func=cmd_simulate)

    bench = commands.add_parser(
        "bench",
        help="benchmark the worker against the baselines and the limits",
        description="Run a benchmark scenario (a packaged one by name, or a TOML file): the "
        "simulated API and the worker in their own processes, the baselines beside them; write "
        "report.json, report.md and charts.",
    )
    configure_bench(bench)
    bench.set_defaults(func=cmd_bench)

    plan = commands.add_parser(
        "plan",
        help="predict drain time, requests and replicas (capacity model)",
        description="The capacity model: from the API's rate limit and latency, the worker's "
        "settings and the change volume, predict throughput, requests, drain time and replicas.",
    )
    configure_plan(plan)
    plan.set_defaults(func=cmd_plan)

    init = commands.add_parser(
        "init",
        help="create what an input needs (table and trigger, consumer group, spool)",
        description="Create, idempotently, what an input needs: the outbox table, its trigger "
        "and dead-letter table; the Redis consumer group; the SQLite spool.",
    )
    producer.configure_init_parser(init)
    init.set_defaults(func=producer.main_init)
    enqueue = commands.add_parser(
        "enqueue",
        help="write JSONL changes from stdin to an input",
        description="Read JSONL changes from standard input and write them to an input, "
        "the way any producer would (see docs/inputs/ for the wire formats).",
    )
    producer.configure_enqueue_parser(enqueue)
    enqueue.set_defaults(func=producer.main_enqueue)

    dlq = commands.add_parser(
        "dlq",
        help="show dead letters; replay their changes into an input",
        description="Look into a dead-letter store (the URI --dlq takes) and put the changes "
        "of dead letters back into an input once their cause is fixed.",
    )
    configure_dlq(dlq)
    dlq.set_defaults(func=cmd_dlq)

    state = commands.add_parser(
        "state",
        help="show or clear what the worker learnt about which IDs exist",
        description="The ID knowledge an input's store holds (docs/id-knowledge.md): how many "
        "IDs are known to exist and known missing, or forget them all.",
    )
    configure_state(state)
    state.set_defaults(func=cmd_state)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script: an error ends a command with one line on stderr and
    its exit code (:func:`failure`), never a traceback."""
    args = build_parser().parse_args(argv)
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
