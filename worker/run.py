"""Wiring one run: open the source and sink, start the HTTP edge and the status port, check
the API, run the engine, close all; SIGTERM/SIGINT routed to each phase (worker.signals)."""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import anyio
import structlog

from worker.backends.base import Source, SourceError
from worker.config import AUTO, Settings, redact_uri, senders
from worker.core.adapt import AdaptSettings
from worker.core.backoff import Backoff
from worker.core.batch import BatchLimits
from worker.core.concurrency import AdaptiveSettings
from worker.core.scheduler import SchedulerSettings
from worker.deadletters.base import DeadLetterError, DeadLetterSink
from worker.engine import Ending, Engine, EngineSettings, Result
from worker.errors import EXIT_AUTH, EXIT_FATAL, EXIT_OK, Fatal, UsageError
from worker.knowledge.base import KnowledgeError
from worker.knowledge.feed import KnowledgeFeed
from worker.knowledge.open import knowledge_store
from worker.preflight import check_api
from worker.sender import Sender
from worker.signals import SignalRouter

if TYPE_CHECKING:
    from aiohttp import web

log = structlog.get_logger("worker.run")

EXIT_CODES = {
    Ending.DRAINED: EXIT_OK,
    Ending.SHUTDOWN: EXIT_OK,
    Ending.SHUTDOWN_TIMEOUT: EXIT_OK,
    Ending.AUTH: EXIT_AUTH,
    Ending.FATAL: EXIT_FATAL,
}
"""The exit code of each way a run that started can end (errors map in worker.errors)."""


def backend_options() -> dict[str, object]:
    """anyio's backend options: uvloop when it is installed."""
    try:
        import uvloop  # noqa: F401  (optional: its presence is the question)
    except ImportError:
        return {}
    return {"use_uvloop": True}


def engine_settings(settings: Settings, *, handle_signals: bool = True) -> EngineSettings:
    """The engine's settings from the command line's."""
    limits = BatchLimits(settings.batch_size, settings.max_body_bytes, settings.linger_ms / 1000)
    scheduler = SchedulerSettings(
        limits=limits,
        backoff=Backoff(max_retry_after_s=settings.max_retry_after_s),
        max_waiting=settings.max_waiting,
        suspect_ttl_s=settings.suspect_ttl_s,
        max_suspects=settings.known_ids,
        max_retries=settings.max_retries,
        confirm_tries=settings.confirm_tries,
        max_not_found_run=settings.max_not_found_run,
        max_contradictions=settings.max_contradictions,
        timeout_grace_s=timeout_grace_s(settings),
    )
    auto = settings.rate == AUTO
    adaptive = settings.concurrency == AUTO
    return EngineSettings(
        scheduler,
        0.0 if auto else float(settings.rate),
        AdaptSettings(max_rate=settings.max_rate) if auto else None,
        concurrency=senders(settings),
        drain_timeout_s=settings.drain_timeout_s,
        handle_signals=handle_signals,
        progress_interval_s=settings.progress_interval_s,
        adaptive=AdaptiveSettings(max_limit=settings.max_concurrency) if adaptive else None,
    )


def timeout_grace_s(settings: Settings) -> float:
    """How long an abandoned request's IDs are fenced: as set, else twice the timeout (a
    server that has not applied a request by then is taken to have dropped it)."""
    if settings.timeout_grace_s is not None:
        return settings.timeout_grace_s
    return 2.0 * settings.request_timeout_s


def tune_runtime() -> None:
    """Tune the interpreter and the C library for a long-running pipeline (before it runs)."""
    tune_gc()
    tune_malloc()


M_MMAP_THRESHOLD = -3
"""glibc's mallopt parameter (malloc.h)."""
MMAP_THRESHOLD_BYTES = 128 * 1024


def tune_malloc() -> None:
    """Make glibc's malloc give large blocks back to the system as soon as they are freed.

    glibc serves a block over 128 KiB with its own mmap, but each time such a block is freed it
    raises that threshold to the block's size (up to 32 MiB), after which the large tables of
    a run (the coalescer's and the ID knowledge's dicts as they grow) come from the heap, where
    a freed one stays: peak RSS 7 MB higher at 1,000,000 changes (benchmarks/hotpath.py,
    2026-12-04). Setting the threshold fixes it at its default. Nothing happens where the C
    library is not glibc.
    """
    if not is_glibc():
        return  # musl, macOS, Windows: nothing to do
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def is_glibc() -> bool:
    """Whether this process runs on glibc (which names itself through confstr)."""
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):
        return False
    return version is not None and version.startswith("glibc")


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a long-running pipeline.

    Each change allocates a handful of tracked objects, so the default threshold (700) runs a
    collection every ~100 changes and re-scans the whole backlog: about a fifth of the CPU. What
    is imported by now lives for the whole run, so it is frozen out of every collection. At
    (50,000, 20, 20) the collector took 0.11 s of CPU over a 1,000,000-change run, against
    0.36 s at (10,000, 10, 10) (benchmarks/hotpath.py, 2026-12-04); a full collection still
    comes every ~20 million allocations (a few million changes), so cyclic garbage of a
    long-running worker is reclaimed.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _ingest(settings: Settings, source: Source) -> Callable[[web.Application], None] | None:
    """The ``POST /v1/changes`` routes of a ``sqlite:`` spool, mounted on the status port."""
    from worker.backends.sqlite.ingest import add_ingest_routes  # with the port only
    from worker.backends.sqlite.source import SqliteSpoolSource

    if not isinstance(source, SqliteSpoolSource):
        return None
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
) -> Result:
    """Run to the end, or raise the :class:`~worker.errors.WorkerError` that stopped it (a
    run stopped by a signal before the engine started ends ``SHUTDOWN``). ``signals``
    (installed by the caller) routes SIGTERM/SIGINT to this run."""
    signals.attach(asyncio.get_running_loop())
    try:
        return await _run(settings, source, sink, signals)
    finally:
        signals.detach()


async def _run(
    settings: Settings, source: Source, sink: DeadLetterSink, signals: SignalRouter
) -> Result:
    async with AsyncExitStack() as opened:
        # Before the engine runs, a signal cancels the start: nothing was read, the run stops
        # at once (a source still connecting, an API check waiting for its answer included).
        prepared: Engine | None = None
        with anyio.CancelScope() as start:
            signals.starting(start)
            prepared = await _prepare(settings, source, sink, opened)
        if signals.stopped_before_start:
            return Result(Ending.SHUTDOWN)
        assert prepared is not None  # only a signal cancels the start
        engine = prepared
        # No await between the end of the start and here: a signal goes to one or the other.
        signals.running(engine)
        try:
            return await engine.run()
        except ExceptionGroup as group:
            matched, rest = group.split((DeadLetterError, SourceError))
            if rest is not None or matched is None:
                raise
            # Past the start, a lost input or sink stopped a run half-way: exit 1, not 2.
            raise Fatal("\ncontact-worker: ".join(map(str, _leaves(matched)))) from group
        finally:
            signals.ending()
    raise AssertionError("unreachable")  # for mypy: the block returns or raises


async def _prepare(
    settings: Settings, source: Source, sink: DeadLetterSink, opened: AsyncExitStack
) -> Engine:
    """Open the input, the sink, the HTTP edge and the status port (each closed by
    ``opened``), then check the API: the engine ready to run. A failure raises its
    :class:`~worker.errors.UsageError` (``SourceError``, ``DeadLetterError``) or
    :class:`~worker.errors.ApiRefused`."""
    await source.open()
    opened.push_async_callback(source.close)
    await sink.open()
    opened.push_async_callback(sink.close)
    sender = await opened.enter_async_context(
        Sender(
            settings.api_url,
            settings.client_id,
            settings.client_secret,
            concurrency=senders(settings),
            timeout_s=settings.request_timeout_s,
        )
    )
    # Replicas of one redis:// or postgresql:// input share the account's rate in its store.
    shared = source.shared_rate() if settings.rate else None
    engine = Engine(
        source, sink, sender, engine_settings(settings, handle_signals=False), shared_rate=shared
    )
    engine.knowledge = await _open_knowledge(settings, engine, opened)
    if settings.http_port:
        # Imported here: aiohttp's server and the spool's routes cost every start without a
        # port about 30 ms of CPU (docs/performance.md).
        from worker.obs.http import serve_status

        # Before the check: a port that is taken is a setting to fix, found before any request
        # is sent. /readyz says `starting` until the engine runs.
        status = serve_status(engine, settings.http_port, configure=_ingest(settings, source))
        try:
            await opened.enter_async_context(status)
        except OSError as exc:
            raise UsageError(
                f"cannot serve --http-port {settings.http_port}: {exc.strerror or exc}"
            ) from exc
    elif settings.source.startswith("sqlite:"):
        log.warning(
            "--http-port 0: POST /v1/changes is off; only `contact-worker enqueue --to` can"
            " feed this spool"
        )
    # Before the engine (which reads) and before /readyz says ready: a refused login or a
    # misconfigured host stops the run with nothing read.
    finding = await check_api(
        sender, request_timeout_s=settings.request_timeout_s, limiter=engine.limiter
    )
    if finding.refusal is not None:
        raise finding.refusal
    engine.pause_from_check(finding.retry_after_s)
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


async def _open_knowledge(
    settings: Settings, engine: Engine, opened: AsyncExitStack
) -> KnowledgeFeed | None:
    """The feed between the input's knowledge store and the engine's scheduler; None for
    memory only. A store that cannot be opened costs requests, not the run: a warning."""
    store = knowledge_store(settings.source, settings.state)
    if store is None or not settings.known_ids or not settings.suspect_ttl_s:
        return None
    try:
        await store.open()
    except KnowledgeError as exc:
        log.warning("knowledge.unavailable", store=store.display, error=str(exc))
        await store.close()
        return None
    opened.push_async_callback(store.close)
    return KnowledgeFeed(store, engine.scheduler.knowledge)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions of a group and of the groups nested in it (task groups nest)."""
    out: list[BaseException] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            out += _leaves(error)
        else:
            out.append(error)
    return out
