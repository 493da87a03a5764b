"""Wiring one run: open the source and sink, start the HTTP edge and the status port, check
the API, run the engine, close all; SIGTERM/SIGINT routed to each phase (worker.signals)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack

import anyio
import structlog
from aiohttp import web

from worker.backends.base import Source, SourceError
from worker.config import Settings, redact_uri
from worker.deadletters.base import DeadLetterError, DeadLetterSink
from worker.engine import Engine, Result
from worker.sender import Sender
from worker.signals import SignalRouter

log = structlog.get_logger("worker.run")


def _ingest(settings: Settings, source: Source) -> Callable[[web.Application], None] | None:
    """The ``POST /v1/changes`` routes of a ``sqlite:`` spool, mounted on the status port."""
    from worker.backends.sqlite.source import SqliteSpoolSource

    if not isinstance(source, SqliteSpoolSource):
        return None
    from worker.backends.sqlite.ingest import add_ingest_routes

    options, spool = source.options, source.spool
    token = settings.ingest_token.reveal() if settings.ingest_token else None
    if not token:
        log.warning("ingest disabled: set WORKER_INGEST_TOKEN (POST /v1/changes answers 503)")

    def configure(app: web.Application) -> None:
        add_ingest_routes(
            app,
            spool,
            token=token,
            max_body_bytes=options.max_body_bytes,
            high_water=options.high_water,
        )

    return configure


async def run_worker(
    settings: Settings, source: Source, sink: DeadLetterSink, signals: SignalRouter
) -> Result | int:
    """Run to the end; an int is an exit code for a failure or a stop before the engine
    started. ``signals`` (installed by the caller) routes SIGTERM/SIGINT to this run."""
    signals.attach(asyncio.get_running_loop())
    try:
        return await _run(settings, source, sink, signals)
    finally:
        signals.detach()


async def _run(
    settings: Settings, source: Source, sink: DeadLetterSink, signals: SignalRouter
) -> Result | int:
    from worker.cli import EXIT_FATAL, EXIT_OK

    async with AsyncExitStack() as opened:
        # Before the engine runs, a signal cancels the start: nothing was read, the run stops
        # at once (a source still connecting, an API check waiting for its answer included).
        with anyio.CancelScope() as start:
            signals.starting(start)
            prepared = await _prepare(settings, source, sink, opened)
        if signals.stopped_before_start:
            return EXIT_OK
        if isinstance(prepared, int):
            return prepared
        engine = prepared
        # No await between the end of the start and here: a signal goes to one or the other.
        signals.running(engine)
        try:
            return await engine.run()
        except ExceptionGroup as group:
            matched, rest = group.split((DeadLetterError, SourceError))
            if rest is not None or matched is None:
                raise
            for error in _leaves(matched):
                print(f"contact-worker: {error}", file=sys.stderr)
            return EXIT_FATAL
        finally:
            signals.ending()
    raise AssertionError("unreachable")  # for mypy: the block returns or raises


async def _prepare(
    settings: Settings, source: Source, sink: DeadLetterSink, opened: AsyncExitStack
) -> Engine | int:
    """Open the input, the sink, the HTTP edge and the status port (each closed by
    ``opened``), then check the API: the engine ready to run, or an exit code."""
    from worker.cli import EXIT_USAGE, engine_settings
    from worker.preflight import check_api

    try:
        await source.open()
    except SourceError as exc:
        print(f"contact-worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    opened.push_async_callback(source.close)
    try:
        await sink.open()
    except DeadLetterError as exc:
        print(f"contact-worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    opened.push_async_callback(sink.close)
    sender = await opened.enter_async_context(
        Sender(
            settings.api_url,
            settings.client_id,
            settings.client_secret,
            concurrency=settings.concurrency,
            timeout_s=settings.request_timeout_s,
        )
    )
    engine = Engine(source, sink, sender, engine_settings(settings, handle_signals=False))
    if settings.http_port:
        # Before the check: a port that is taken is a setting to fix, found before any request
        # is sent. /readyz says `starting` until the engine runs.
        from worker.obs.http import serve_status

        status = serve_status(engine, settings.http_port, configure=_ingest(settings, source))
        try:
            await opened.enter_async_context(status)
        except OSError as exc:
            print(
                f"contact-worker: cannot serve --http-port {settings.http_port}: "
                f"{exc.strerror or exc}",
                file=sys.stderr,
            )
            return EXIT_USAGE
    elif settings.source.startswith("sqlite:"):
        log.warning(
            "--http-port 0: POST /v1/changes is off; only `contact-worker enqueue --to` can"
            " feed this spool"
        )
    # Before the engine (which reads) and before /readyz says ready: a refused login or a
    # misconfigured host stops the run with nothing read.
    finding = await check_api(sender, request_timeout_s=settings.request_timeout_s)
    if finding.exit_code is not None:
        print(f"contact-worker: {finding.message}", file=sys.stderr)
        return finding.exit_code
    log.info(
        "starting",
        source=redact_uri(settings.source),
        dlq=redact_uri(settings.dlq),
        api_url=redact_uri(settings.api_url),
        batch_size=settings.batch_size,
        rate=settings.rate,
        concurrency=settings.concurrency,
    )
    return engine


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions of a group and of the groups nested in it (task groups nest)."""
    out: list[BaseException] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            out += _leaves(error)
        else:
            out.append(error)
    return out
