"""The ``contact-worker`` command: run, demo, simulate."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio

from worker import __version__
from worker.config import ConfigError, Settings, add_options, resolve
from worker.engine import Ending, EngineSettings, Result
from worker.obs import logging as obs_logging

if TYPE_CHECKING:
    from worker.signals import SignalRouter

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_AUTH = 0, 1, 2, 3

EXIT_CODES = {
    Ending.DRAINED: EXIT_OK,
    Ending.SHUTDOWN: EXIT_OK,
    Ending.SHUTDOWN_TIMEOUT: EXIT_OK,
    Ending.AUTH: EXIT_AUTH,
    Ending.FATAL: EXIT_FATAL,
}


def _backend_options() -> dict[str, object]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def engine_settings(settings: Settings, *, handle_signals: bool = True) -> EngineSettings:
    """The engine's settings from the command line's."""
    from worker.core.backoff import Backoff
    from worker.core.batch import BatchLimits
    from worker.core.scheduler import SchedulerSettings

    limits = BatchLimits(settings.batch_size, settings.max_body_bytes, settings.linger_ms / 1000)
    scheduler = SchedulerSettings(
        limits=limits,
        backoff=Backoff(),
        max_waiting=settings.max_waiting,
        suspect_ttl_s=settings.suspect_ttl_s,
        max_retries=settings.max_retries,
        confirm_tries=settings.confirm_tries,
        max_not_found_run=settings.max_not_found_run,
        timeout_grace_s=timeout_grace_s(settings),
    )
    return EngineSettings(
        scheduler,
        settings.rate,
        settings.concurrency,
        settings.drain_timeout_s,
        handle_signals,
        settings.progress_interval_s,
    )


def timeout_grace_s(settings: Settings) -> float:
    """How long an abandoned request's IDs are fenced: as set, else twice the timeout (a
    server that has not applied a request by then is taken to have dropped it)."""
    if settings.timeout_grace_s is not None:
        return settings.timeout_grace_s
    return 2.0 * settings.request_timeout_s


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a long-running pipeline.

    Each change allocates a handful of tracked objects, so the default threshold (700) runs a
    collection every ~100 changes and re-scans the whole backlog: about a fifth of the CPU. What
    is imported by now lives for the whole run, so it is frozen out of every collection.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def _fail(message: str, code: int) -> int:
    print(f"contact-worker: {message}", file=sys.stderr)
    return code


def cmd_run(args: argparse.Namespace) -> int:
    """``contact-worker run``: SIGTERM and SIGINT are handled from its first line to the exit."""
    from worker.signals import SignalRouter

    signals = SignalRouter()
    signals.install()
    try:
        return _run(args, signals)
    finally:
        signals.finish()


def _run(args: argparse.Namespace, signals: SignalRouter) -> int:
    try:
        settings = resolve(args, os.environ)
        from worker.backends import open_sink, open_source

        source = open_source(
            settings.source, follow=settings.follow, checkpoint=settings.checkpoint
        )
        sink = open_sink(settings.dlq)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    obs_logging.configure(settings.log_format, settings.log_level)
    from worker.run import run_worker

    tune_gc()

    try:
        result: Result | int = anyio.run(
            run_worker, settings, source, sink, signals, backend_options=_backend_options()
        )
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_FATAL)
    except Exception as exc:  # the last line of defence: a message and exit 1, not a traceback
        import structlog

        structlog.get_logger("worker").exception("fatal error")
        return _fail(f"fatal error: {type(exc).__name__}: {exc}", EXIT_FATAL)
    if isinstance(result, int):
        return result
    if result.message and result.ending in (Ending.AUTH, Ending.FATAL):
        print(f"contact-worker: {result.message}", file=sys.stderr)
    return EXIT_CODES[result.ending]


def cmd_simulate(args: argparse.Namespace) -> int:
    """``contact-worker simulate``."""
    from worker.sim.cli import main as simulate_main

    return simulate_main(args)


def cmd_demo(args: argparse.Namespace) -> int:
    """``contact-worker demo``."""
    from worker.demo import main as demo_main

    return demo_main(args)


def cmd_bench(args: argparse.Namespace) -> int:
    """``contact-worker bench``."""
    from worker.bench.bench_cli import main as bench_main

    return bench_main(args)


def cmd_config(args: argparse.Namespace) -> int:
    """``contact-worker config``."""
    from worker.config_cli import main as config_main

    return config_main(args)


def cmd_plan(args: argparse.Namespace) -> int:
    """``contact-worker plan``."""
    from worker.bench.plan_cli import main as plan_main

    return plan_main(args)


def cmd_dlq(args: argparse.Namespace) -> int:
    """``contact-worker dlq``."""
    from worker.deadletters.cli import main as dlq_main

    return dlq_main(args)


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

    from worker.config_cli import configure_parser as configure_config

    config = commands.add_parser(
        "config",
        help="show the settings `run` would use and where each comes from",
        description="Resolve the settings exactly as `run` does (flags, environment, --config "
        "file, defaults) and print each with its origin; secrets masked. Exit 2 if `run` "
        "would refuse them.",
    )
    configure_config(config)
    config.set_defaults(func=cmd_config)

    from worker.demo import configure_parser as configure_demo

    demo = commands.add_parser(
        "demo",
        help="run the worker end to end on a simulated API",
        description="Generate a realistic change stream, start the "
        "simulated gateway in-process and run the real engine on it.",
    )
    configure_demo(demo)
    demo.set_defaults(func=cmd_demo)

    from worker.sim.cli import configure_parser as configure_simulate

    simulate = commands.add_parser(
        "simulate",
        help="serve the simulated SMS Gateway API",
        description="A faithful fake of PATCH /v1/contact for tests and benchmarks.",
    )
    configure_simulate(simulate)
    simulate.set_defaults(func=cmd_simulate)

    from worker.bench.bench_cli import configure_parser as configure_bench

    bench = commands.add_parser(
        "bench",
        help="benchmark the worker against the baselines and the limits",
        description="Run a benchmark scenario (a packaged one by name, or a TOML file): the "
        "simulated API and the worker in their own processes, the baselines beside them; write "
        "report.json, report.md and charts.",
    )
    configure_bench(bench)
    bench.set_defaults(func=cmd_bench)

    from worker.bench.plan_cli import configure_parser as configure_plan

    plan = commands.add_parser(
        "plan",
        help="predict drain time, requests and replicas (capacity model)",
        description="The capacity model: from the API's rate limit and latency, the worker's "
        "settings and the change volume, predict throughput, requests, drain time and replicas.",
    )
    configure_plan(plan)
    plan.set_defaults(func=cmd_plan)
    from worker import producer

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

    from worker.deadletters.cli import configure_parser as configure_dlq

    dlq = commands.add_parser(
        "dlq",
        help="show dead letters; replay their changes into an input",
        description="Look into a dead-letter store (the URI --dlq takes) and put the changes "
        "of dead letters back into an input once their cause is fixed.",
    )
    configure_dlq(dlq)
    dlq.set_defaults(func=cmd_dlq)
    return parser


def failure(exc: BaseException) -> tuple[str, int]:
    """The one line (after ``contact-worker: ``) and the exit code of an error that ended a
    command (README "Exit codes"): 2 when nothing was done because a setting, a URI or what it
    names is wrong or cannot be reached; 1 when the command stopped half-way, or for anything
    unforeseen."""
    from worker.backends.base import EnqueueStopped, SourceError
    from worker.deadletters.base import DeadLetterError

    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]  # anyio's task groups wrap what one task raised
    if isinstance(exc, EnqueueStopped):
        return str(exc), EXIT_FATAL
    if isinstance(exc, ConfigError | SourceError | DeadLetterError):
        return str(exc), EXIT_USAGE
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", EXIT_FATAL
    return f"fatal error: {type(exc).__name__}: {exc}", EXIT_FATAL


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script: an error ends a command with one line on stderr and
    its exit code (:func:`failure`), never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (Exception, KeyboardInterrupt) as exc:
        code = _fail(*failure(exc))
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
