"""Wiring one run: open the source and sink, start the HTTP edge, run the engine, close all."""

from __future__ import annotations

import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import structlog
from aiohttp import web

from worker.config import Settings, redact_uri
from worker.deadletters.base import DeadLetterError, DeadLetterSink
from worker.engine import Engine, Result
from worker.sender import Sender
from worker.sources.base import Source, SourceError

log = structlog.get_logger("worker.run")

T = TypeVar("T")


class _Stopped(Exception):
    """SIGTERM/SIGINT came before the engine started."""


async def _unless_stopped(work: Awaitable[T]) -> T:
    """Await ``work``, unless SIGTERM/SIGINT comes first: then cancel it and raise _Stopped.

    Before the engine runs (connecting to the source, the API check) nothing was read, so a
    stop is clean at once. Without this the default action of SIGTERM would kill the process
    (and as PID 1 in a container the signal would be ignored until the engine starts).
    """
    stopped = False
    value: T | None = None
    error: Exception | None = None

    async def watch(scope: anyio.CancelScope) -> None:
        nonlocal stopped
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal received before the start: stopping", signal=signum.name)
                stopped = True
                scope.cancel()
                return

    async with anyio.create_task_group() as group:
        group.start_soon(watch, group.cancel_scope)
        try:
            value = await work
        except Exception as exc:  # re-raised below, outside the task group
            error = exc
        group.cancel_scope.cancel()
    if stopped:
        raise _Stopped
    if error is not None:
        raise error
    return value  # type: ignore[return-value]


def _ingest(settings: Settings, source: Source) -> Callable[[web.Application], None] | None:
    """The ``POST /v1/changes`` routes of a ``sqlite:`` spool, mounted on the status port."""
    from worker.sources.sqlite_spool import SqliteSpoolSource

    if not isinstance(source, SqliteSpoolSource):
        return None
    from worker.ingest import add_ingest_routes

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


async def run_worker(settings: Settings, source: Source, sink: DeadLetterSink) -> Result | int:
    """Run to the end; an int is an exit code for a failure or a stop before the engine
    started."""
    from worker.cli import EXIT_OK

    try:
        return await _run(settings, source, sink)
    except _Stopped:
        return EXIT_OK


async def _run(settings: Settings, source: Source, sink: DeadLetterSink) -> Result | int:
    from worker.cli import EXIT_FATAL, EXIT_USAGE, engine_settings
    from worker.preflight import check_api

    try:
        await _unless_stopped(source.open())
    except SourceError as exc:
        print(f"contact-worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        try:
            await _unless_stopped(sink.open())
        except DeadLetterError as exc:
            print(f"contact-worker: {exc}", file=sys.stderr)
            return EXIT_USAGE
        async with Sender(
            settings.api_url,
            settings.client_id,
            settings.client_secret,
            concurrency=settings.concurrency,
            timeout_s=settings.request_timeout_s,
        ) as sender:
            # Before the engine (which reads) and the status port (/readyz): a refused login
            # or a misconfigured host stops the run with nothing read.
            finding = await _unless_stopped(
                check_api(sender, request_timeout_s=settings.request_timeout_s)
            )
            if finding.exit_code is not None:
                print(f"contact-worker: {finding.message}", file=sys.stderr)
                return finding.exit_code
            engine = Engine(source, sink, sender, engine_settings(settings))
            log.info(
                "starting",
                source=redact_uri(settings.source),
                dlq=redact_uri(settings.dlq),
                api_url=redact_uri(settings.api_url),
                batch_size=settings.batch_size,
                rate=settings.rate,
                concurrency=settings.concurrency,
            )
            try:
                if not settings.http_port:
                    if settings.source.startswith("sqlite:"):
                        log.warning(
                            "--http-port 0: POST /v1/changes is off; only `contact-"
                            "worker enqueue --to` can feed this spool"
                        )
                    return await engine.run()
                from worker.obs.http import serve_status

                try:
                    status = serve_status(
                        engine, settings.http_port, configure=_ingest(settings, source)
                    )
                    await _unless_stopped(status.__aenter__())
                except OSError as exc:
                    print(
                        f"contact-worker: cannot serve --http-port {settings.http_port}: "
                        f"{exc.strerror or exc}",
                        file=sys.stderr,
                    )
                    return EXIT_USAGE
                try:
                    return await engine.run()
                finally:
                    await status.__aexit__(None, None, None)
            except ExceptionGroup as group:
                matched, rest = group.split((DeadLetterError, SourceError))
                if rest is not None or matched is None:
                    raise
                for error in _leaves(matched):
                    print(f"contact-worker: {error}", file=sys.stderr)
                return EXIT_FATAL
    finally:
        await sink.close()
        await source.close()


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions of a group and of the groups nested in it (task groups nest)."""
    out: list[BaseException] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            out += _leaves(error)
        else:
            out.append(error)
    return out
