"""``contact-worker run``: its options, and the command from resolution to exit code."""

from __future__ import annotations

import argparse
import os
import sys

import anyio
import structlog

from worker.backends import open_sink, open_source
from worker.config import add_options
from worker.config_file import resolve
from worker.engine import Ending
from worker.errors import WorkerError
from worker.obs import logging as obs_logging
from worker.run import EXIT_CODES, backend_options, run_worker, tune_runtime
from worker.signals import SignalRouter


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Every option of ``run`` (each also read from its variable and the --config file)."""
    add_options(parser)


def main(args: argparse.Namespace) -> int:
    """SIGTERM and SIGINT are handled from the command's first line to its exit."""
    signals = SignalRouter()
    signals.install()
    try:
        return _run(args, signals)
    finally:
        signals.finish()


def _run(args: argparse.Namespace, signals: SignalRouter) -> int:
    """Resolve, open and run; an error that stops it goes to ``worker.cli.main`` (one line,
    its exit code); a run that ended maps its ending to the exit code."""
    settings = resolve(args, os.environ)
    obs_logging.configure(settings.log_format, settings.log_level)  # before the URIs' warnings
    source = open_source(settings.source, follow=settings.follow, checkpoint=settings.checkpoint)
    sink = open_sink(settings.dlq)
    tune_runtime()
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
