"""The engine: anyio tasks carrying out the scheduler's decisions (DESIGN "Data flow").

reader: source -> decode+validate -> scheduler (waits while the scheduler is full)
senders (x concurrency): [a slot under the adaptive limit] -> rate limiter -> next batch -> PATCH
    -> classify -> scheduler.resolve -> dead letters (durable) -> the acknowledger's queue
    (waits while it is full; an input that acknowledges by count is told at once instead)
acknowledger: everything queued since its last write -> source.ack, one call at a time
reporter (with a progress interval): one ``progress`` log event per interval
Everything that decides lives in ``worker.core``; this module only waits, sends and writes.
"""

from __future__ import annotations

import datetime
import enum
import itertools
import math
import signal
import time
from collections.abc import Awaitable, Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import structlog

from worker.backends.base import Held, HeldRecords, Record, Source
from worker.core.adapt import AdaptSettings, AdaptStatistics, RateController, read_hints
from worker.core.batch import Batch
from worker.core.change import Invalid, decode_all
from worker.core.classify import Action, Verdict, classify, classify_failure
from worker.core.coalesce import Entry, all_tokens, changes_in
from worker.core.concurrency import AdaptiveLimit, AdaptiveSettings, Sample
from worker.core.scheduler import ReplayEnd, Scheduler, SchedulerSettings, Settled
from worker.core.split import DeadLetter
from worker.deadletters.base import DeadLetterSink, record
from worker.knowledge.feed import KnowledgeFeed
from worker.limiter import RateLimiter, SharedRate
from worker.obs.histograms import EngineHistograms
from worker.sender import SEND_ERRORS, Response

log = structlog.get_logger("worker.engine")

READ_SLICE = 1024
"""Records handed to the scheduler at a time between checks of its bound; the reader lets
the senders run after each slice (the cadence ``worker.bench.model.sender_pace`` assumes)."""

RATE_WAITED_S = 0.001
"""A sender that waited longer than this for the rate limiter was held by the rate: its
request tells the adaptive concurrency limit that more in flight would not help."""

ACK_BACKLOG = 50_000
"""Changes settled and not yet acknowledged above which the senders wait for the acknowledger
(the acknowledgements' bounded queue)."""


PAUSE_WARN_S = 5.0
"""A pause of every sender (``Retry-After``) this long or longer is worth a warning."""


class Patcher(Protocol):
    """What the engine needs from the HTTP edge (the real one is :class:`worker.sender.Sender`)."""

    async def patch(self, body: bytes) -> Response: ...


class Ending(enum.Enum):
    """How a run ended; the command line maps it to an exit code."""

    DRAINED = "drained"
    """A finite input was read to its end and every change applied or dead-lettered."""
    SHUTDOWN = "shutdown"
    """Stopped by a signal (or :meth:`Engine.shutdown`) and drained in time."""
    SHUTDOWN_TIMEOUT = "shutdown_timeout"
    """Stopped by a signal; the drain timeout passed with requests unfinished (left unacked)."""
    AUTH = "auth"
    """The API refused the credentials or the account: nothing more was sent."""
    FATAL = "fatal"


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """The engine's own settings (the scheduler's are inside)."""

    scheduler: SchedulerSettings = SchedulerSettings()
    rate: float = 10.0
    """Requests per second; 0 means no limit (with ``adapt``: ignored)."""
    adapt: AdaptSettings | None = None
    """``--rate auto``: the rate is learned from the API's answers, up to its ``max_rate``."""
    pause_warn_s: float = PAUSE_WARN_S
    """Pauses of every sender at least this long are logged at warning and make /readyz
    say ``paused``."""
    concurrency: int = 8
    """Senders: requests in flight at most (the ceiling, with ``adaptive``)."""
    drain_timeout_s: float = 30.0
    handle_signals: bool = True
    progress_interval_s: float = 0.0
    """Seconds between ``progress`` log events; 0 = none."""
    adaptive: AdaptiveSettings | None = None
    """``--concurrency auto``: in flight follows :class:`AdaptiveLimit` up to ``concurrency``."""


@dataclass(slots=True)
class EngineStats:
    """The engine's own counters, beside the scheduler's."""

    records: int = 0
    invalid: int = 0
    stale: int = 0
    """Records dropped unread: their partition's holding ended before they were taken in."""
    acked: int = 0
    in_flight: int = 0
    rate_wait_s: float = 0.0
    pauses: int = 0
    """Pauses of every sender the API asked for (``Retry-After``)."""
    paused_s: float = 0.0
    """Seconds every sender was paused, overlapping pauses counted once."""
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def elapsed_s(self) -> float:
        """Seconds since the run started (until it finished)."""
        return (self.finished or time.monotonic()) - self.started


@dataclass(frozen=True, slots=True)
class ProgressMark:
    """Where the last ``progress`` event left the counters: its rates are measured from here."""

    at: float
    records: int
    acked: int
    rate_wait_s: float


def _per_s(count: int, span_s: float) -> float:
    return round(count / span_s, 1) if span_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Result:
    """The end of a run."""

    ending: Ending
    verdict: Verdict | None = None
    message: str = ""


class Wakeup:
    """Wakes the tasks waiting for something to change, all of them at once.

    An anyio Event cannot be cleared: one that was set is replaced. Only when a task waits on
    it, though: a task registers before it waits, with nothing awaited in between, so none
    misses a notification. The engine notifies after every slice read and every answer, and
    building an Event for nobody each time (2 µs, through anyio's backend look-up) was a
    measurable share of the hot path; so is a cancel scope (5 µs), built only for a wait with
    a deadline."""

    __slots__ = ("_event", "_waiters")

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._waiters = 0

    def notify(self) -> None:
        """Wake every task waiting now."""
        if self._waiters:
            self._event.set()
            self._event = anyio.Event()

    async def wait(self, delay_s: float | None = None) -> None:
        """Until the next :meth:`notify`, or ``delay_s`` seconds (None: no deadline)."""
        event = self._event
        self._waiters += 1
        try:
            if delay_s is None:
                await event.wait()
            else:
                with anyio.move_on_after(delay_s):
                    await event.wait()
        finally:
            self._waiters -= 1


class Engine:
    """Runs one source into the API until the input ends, a signal comes, or a fatal error."""

    def __init__(
        self,
        source: Source,
        dead_letters: DeadLetterSink,
        patcher: Patcher,
        settings: EngineSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
        shared_rate: SharedRate | None = None,
    ) -> None:
        self.source = source
        self.dead_letters = dead_letters
        self.patcher = patcher
        self.settings = settings or EngineSettings()
        self.scheduler = Scheduler(self.settings.scheduler)
        # An input that acknowledges by count reads no token: of a merged change's, only the
        # first and the last are kept, for its dead letter to name.
        self.scheduler.coalescer.keep_tokens = not source.acks_by_count
        self.scheduler.coalescer.tokens_numbered = source.tokens_numbered
        self.stats = EngineStats()
        self.histograms = EngineHistograms()
        self._clock = clock
        self._wall_clock = wall_clock
        adapt = self.settings.adapt
        self.controller = None if adapt is None else RateController(adapt, clock())
        rate = self.settings.rate if self.controller is None else self.controller.rate
        self.limiter = RateLimiter(rate, shared=shared_rate, clock=clock) if rate > 0 else None
        """Every request waits for it, the start-up check's included (worker.run)."""
        self._paused_until = 0.0
        self._long_pause_until = 0.0
        adaptive = self.settings.adaptive
        self.adaptive = None if adaptive is None else AdaptiveLimit(adaptive)
        """The adaptive concurrency limit (``--concurrency auto``), or None (fixed)."""
        self._slots = 0
        self._slot_freed = Wakeup()
        self._changed = Wakeup()
        """Something a waiting sender or the reader may act on: records taken in, an answer."""
        # Settled changes waiting for the acknowledger: their tokens, and for the change-to-ack
        # histogram the entries they came in (with how many changes each group carried).
        # (An input that acknowledges by count, ``Source.acks_by_count``, is told at once.)
        self._ack_tokens: list[Hashable] = []
        self._ack_entries: list[tuple[list[Entry], int]] = []
        self._ack_queued = Wakeup()
        self._ack_taken = Wakeup()
        self._producers = 0
        """Reader and senders still running: the acknowledger stops once none is and its
        queue is empty."""
        self._requests = itertools.count(1)
        self._running = False
        self._reading_done = False
        self._stopping = False
        self._signalled = anyio.Event()
        """A signal came: the drain timeout runs."""
        self._result: Result | None = None
        self._reader_scope: anyio.CancelScope | None = None
        self._work_scope: anyio.CancelScope | None = None
        self.knowledge: KnowledgeFeed | None = None
        """Where the ID knowledge lasts (the input's store), set before :meth:`run`."""
        source.assignments = self
        source.replay = self

    # -- partitions (the source's AssignmentListener) ----------------------------------------

    def assigned(self, partitions: Collection[int]) -> None:
        """The source reads these partitions from now on (nothing to do: records of a holding
        are taken in while it is current)."""
        log.debug("source.assigned", partitions=sorted(partitions))

    def revoked(self, partitions: Collection[int], covers: Callable[[str], bool]) -> int:
        """Forget the waiting changes of the IDs ``covers`` selects, unacknowledged; records
        of these partitions read and not taken in yet are dropped when their turn comes."""
        forgotten = self.scheduler.coalescer.forget(covers)
        changes = sum(entry.changes for entry in forgotten)
        if forgotten:
            log.warning(
                "partition lost: forgot waiting changes",
                partitions=sorted(partitions),
                ids=len(forgotten),
                changes=changes,
            )
            self._changed.notify()
        return changes

    def ids_in_flight(self) -> int:
        """Contact IDs whose requests may still change something at the API: in flight now,
        retries waiting, fenced after a timeout; not the lone 404s held for a 2xx (answered:
        a rebalance waiting on them would wait for a 2xx its own hold keeps from coming)."""
        scheduler = self.scheduler
        return scheduler.coalescer.ids_in_flight - scheduler.ids_answered

    # -- replay ranges (DESIGN 9: the source's ReplayListener) ------------------------------

    def replay_started(self, name: str, covers: Callable[[str], bool] | None) -> None:
        """Hold the IDs of this replay range until the source has read it to its end."""
        if self._stopping:
            return  # nothing more is read: a hold now would only keep changes from draining
        if self.scheduler.start_replay(name, covers, self._clock()):
            log.info("source.replay_started", range=name, ids="all" if covers is None else "some")

    def replay_done(self, name: str) -> None:
        """The range was read: its IDs, coalesced, may be sent."""
        end = self.scheduler.end_replay(name, self._clock())
        if end is not None:
            self._replay_ended([end])

    def _replay_ended(self, ends: list[ReplayEnd]) -> None:
        for end in ends:
            fields = {
                "range": end.name,
                "changes": end.changes,
                "ids": end.ids,
                "held_s": round(end.held_s, 3),
                "complete": end.complete,
            }
            if end.complete:
                log.info("source.replay_done", **fields)
            else:
                log.warning(
                    "source.replay_done",
                    **fields,
                    why="twice --max-waiting held before the range was read: sending starts; a"
                    " contact whose newer change lies further in the range may regress briefly",
                )
        if ends:
            self._changed.notify()

    # -- wake-ups ----------------------------------------------------------------------------

    # -- running -----------------------------------------------------------------------------

    async def run(self) -> Result:
        """Run to the end; the source and sink are opened and closed by the caller."""
        self.stats.started = time.monotonic()
        self._running = True
        async with anyio.create_task_group() as outer:
            self.source.start(outer)
            outer.start_soon(self._drain_deadline)
            if self.settings.handle_signals:
                outer.start_soon(self._watch_signals)
            if self.settings.progress_interval_s > 0:
                outer.start_soon(self._report_progress, self.settings.progress_interval_s)
            if self.knowledge is not None:
                outer.start_soon(self.knowledge.run)
            async with anyio.create_task_group() as work:
                self._work_scope = work.cancel_scope
                self._producers = 1 + self.settings.concurrency
                work.start_soon(self._producing, self._read)
                for _ in range(self.settings.concurrency):
                    work.start_soon(self._producing, self._send_loop)
                work.start_soon(self._acknowledge)
            outer.cancel_scope.cancel()
        if self.knowledge is not None:
            with anyio.CancelScope(shield=True):
                await self.knowledge.flush()  # what the last requests taught
        self.stats.finished = time.monotonic()
        self._running = False
        result = self._result or Result(Ending.DRAINED)
        log.info("summary", ending=result.ending.value, **self.summary())
        return result

    def shutdown(self) -> None:
        """Stop reading, flush what waits without linger, finish in-flight requests."""
        if self._stopping:
            return
        self._stopping = True
        log.info("shutdown requested", in_flight=self.scheduler.outstanding)
        if self._reader_scope is not None:
            self._reader_scope.cancel()
        self._reading_done = True
        self.scheduler.draining = True
        fenced = self.scheduler.drop_fenced()
        if fenced:  # not worth a drain timeout: read again, coalesced, at the next start
            log.info(
                "shutdown.fenced_dropped",
                ids=len(fenced),
                changes=sum(entry.changes for entry in fenced),
            )
        dropped = self.scheduler.drop_replays()
        if dropped:
            log.info(
                "source.replay_dropped",
                ids=len(dropped),
                changes=sum(entry.changes for entry in dropped),
            )
        if self._result is None:
            self._result = Result(Ending.SHUTDOWN)
        self._changed.notify()

    def abort(self, result: Result) -> None:
        """Stop everything now: nothing more is sent or acknowledged."""
        if self._result is None or self._result.ending in (Ending.SHUTDOWN, Ending.DRAINED):
            self._result = result
        if self._work_scope is not None:
            self._work_scope.cancel()

    def on_signal(self, signum: signal.Signals) -> None:
        """SIGTERM/SIGINT came (to whoever receives them): the first drains, for at most the
        drain timeout; another one (or one after :meth:`shutdown`) stops without draining.
        Before :meth:`run` too: the run then stops as soon as it starts."""
        if self._stopping:
            self._interrupted(signum)
            return
        self._signalled.set()
        self.shutdown()

    async def _watch_signals(self) -> None:
        # The receiver stays open while draining: a second signal must come here, not to the
        # default handler, which would kill the process before the input and sink are closed.
        # (`contact-worker run` receives signals for the whole process instead: worker.signals)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal.received", signal=signum.name)
                self.on_signal(signum)

    async def _drain_deadline(self) -> None:
        await self._signalled.wait()
        await anyio.sleep(self.settings.drain_timeout_s)
        log.warning(
            "drain timeout: leaving unfinished changes unacknowledged",
            in_flight=self.scheduler.outstanding,
        )
        self.abort(Result(Ending.SHUTDOWN_TIMEOUT, message="drain timeout"))

    def _interrupted(self, signum: signal.Signals) -> None:
        log.warning("second signal: stopping without draining", signal=signum.name)
        self.abort(Result(Ending.SHUTDOWN_TIMEOUT, message="interrupted twice"))

    async def _producing(self, task: Callable[[], Awaitable[None]]) -> None:
        """Run the reader or a sender; the last to end lets the acknowledger finish."""
        try:
            await task()
        finally:
            self._producers -= 1
            if self._producers == 0:
                self._ack_queued.notify()

    async def _read(self) -> None:
        scheduler = self.scheduler
        with anyio.CancelScope() as scope:
            self._reader_scope = scope
            if self._stopping:
                scope.cancel()
            while True:
                records = await self.source.read()
                if records is None:
                    break
                if isinstance(records, HeldRecords):
                    for i, held in enumerate(records, start=1):
                        await self._take_slices(held.records, held, i < len(records))
                else:
                    await self._take_slices(records, None)
        self._reading_done = True
        scheduler.draining = True
        if not self._stopping:  # the input ended: every range was read
            self._replay_ended(scheduler.end_all_replays(self._clock()))
        self._changed.notify()

    async def _take_slices(
        self, records: Sequence[Record], held: Held | None, more: bool = False
    ) -> None:
        """Take these records in, a slice at a time, waiting for room before each; records
        read under a holding that ended meanwhile (``held``) are dropped, never acknowledged.
        While more is readable (the rest of these, ``more`` records after them, or what the
        source says it has), the scheduler reads ahead before it sends."""
        scheduler = self.scheduler
        # Slices keep the bound on waiting changes close, whatever the chunk size.
        for start in range(0, len(records), READ_SLICE):
            scheduler.read_ahead(
                more or start + READ_SLICE < len(records) or self.source.backlog, self._clock()
            )
            while not scheduler.may_read:
                self._replay_ended(scheduler.end_replays_when_full(self._clock()))
                await self._changed.wait()
            if held is not None and not self.source.current(held.partition, held.generation):
                rest = records[start:]
                self.stats.stale += len(rest)
                log.info(
                    "source.stale_dropped",
                    partition=held.partition,
                    generation=held.generation,
                    records=len(rest),
                )
                self.source.dropped(Held(held.partition, held.generation, rest))
                return
            await self._take(records[start : start + READ_SLICE])
            await anyio.lowlevel.checkpoint()
        if scheduler.read_ahead(more or self.source.backlog, self._clock()):
            self._changed.notify()  # the backlog is read: senders waiting for it may go

    async def _take(self, records: Sequence[Record]) -> None:
        scheduler = self.scheduler
        now = self._clock()
        valid, invalid = decode_all(records)
        if self.source.files_by_key and valid:
            misfiled, kept = self.source.misfiled, []
            for item in valid:
                problem = misfiled(item[2], item[0])
                if problem is None:
                    kept.append(item)
                else:
                    invalid.append(Invalid(problem, item[2], change=item[1]))
            valid = kept
        if self.knowledge is not None and valid:
            # Before the scheduler sees them: what the store knows shapes their batches.
            await self.knowledge.prefetch(key for key, _, _ in valid)
            now = self._clock()
        scheduler.add_all(valid, now)
        self.stats.records += len(records)
        self._changed.notify()
        if invalid:
            self.stats.invalid += len(invalid)
            await self._dead_letter_invalid(invalid)

    async def _send_loop(self) -> None:
        limiter = self.limiter
        while True:
            await self._take_slot()
            try:
                if self._reading_done and self.scheduler.idle:
                    return  # drained: --max-concurrency senders need not wait on the rate
                # Wait for a slot before taking a batch (formed as late as possible), count
                # the request only when it goes: a sender that waited for work meanwhile
                # cannot send on a slot that has passed (the one-second windows stay exact).
                waited_s = 0.0
                if limiter is not None:
                    waited_s += await self._rate_wait(limiter.ready())
                batch = await self._next_batch()
                if batch is None:
                    return
                if limiter is not None:
                    waited_s += await self._rate_wait(limiter.acquire())
                await self._send(batch, waited_s > RATE_WAITED_S)
            finally:
                self._give_slot()

    @property
    def concurrency_limit(self) -> int:
        """Requests that may be in flight now: ``--concurrency``, or the adaptive limit."""
        return self.settings.concurrency if self.adaptive is None else self.adaptive.limit

    async def _take_slot(self) -> None:
        """Under ``--concurrency auto``: wait until fewer senders than the limit are busy."""
        if self.adaptive is None:
            return
        while self._slots >= self.adaptive.limit:
            await self._slot_freed.wait()
        self._slots += 1

    def _give_slot(self) -> None:
        if self.adaptive is None:
            return
        self._slots -= 1
        self._slot_freed.notify()

    def _adapt(
        self,
        started: float,
        in_flight: tuple[int, int, bool],
        verdict: Verdict,
        rate_waited: bool,
    ) -> None:
        """Tell the adaptive limit how this request went (``in_flight``: requests in flight,
        the limit, and whether a full batch more was ready when it went out); wake waiting
        senders if the limit grew."""
        adaptive = self.adaptive
        if adaptive is None:
            return
        now = self._clock()
        status = verdict.status
        failed = verdict.action is Action.RETRY and (status is None or status >= 500)
        before = adaptive.limit
        count, limit, queued = in_flight
        sample = Sample(
            now - started,
            count,
            limit,
            rate_waited=rate_waited or status == 429,
            failed=failed,
            queued=queued,
        )
        rate = 0.0 if self.limiter is None else self.limiter.rate_per_s
        if adaptive.answered(sample, now, rate if rate > 0 else None) > before:
            self._slot_freed.notify()

    async def _rate_wait(self, waiting: Awaitable[None]) -> float:
        """Wait on the rate limiter; the seconds it took (counted in ``rate_wait_s``)."""
        started = self._clock()
        await waiting
        waited_s = self._clock() - started
        self.stats.rate_wait_s += waited_s
        return waited_s

    async def _next_batch(self) -> Batch | None:
        scheduler = self.scheduler
        while True:
            now = self._clock()
            due = scheduler.settle_due(now)
            if due is not None:  # fences lifted; lone 404s that nothing can confirm any more
                await self._carry_out(due)
            planned = scheduler.next_batch(now)
            if isinstance(planned, Batch):
                return planned
            if scheduler.fatal is not None:
                return None
            if self._reading_done and scheduler.idle:
                self._changed.notify()  # let the other senders see it too
                return None
            await self._changed.wait(None if planned is None else max(0.0, planned - now))

    async def _send(self, batch: Batch, rate_waited: bool = False) -> None:
        # Every log line of this request (dead letters, retries, a fatal answer) carries its
        # ids; bound once per request, in this sender's own task context.
        bound = structlog.contextvars.bind_contextvars(
            batch=batch.number, request=next(self._requests)
        )
        try:
            await self._send_bound(batch, rate_waited)
        finally:
            structlog.contextvars.reset_contextvars(**bound)

    async def _send_bound(self, batch: Batch, rate_waited: bool) -> None:
        body = batch.body()
        histograms = self.histograms
        histograms.batch_contacts.observe(len(batch.entries))
        self.stats.in_flight += 1
        scheduler = self.scheduler
        in_flight = (
            self.stats.in_flight,
            self.concurrency_limit,
            scheduler.coalescer.ready_count >= scheduler.ceiling,
        )
        started = self._clock()
        response: Response | None = None
        try:
            answer = await self.patcher.patch(body)
        except SEND_ERRORS as exc:
            verdict = classify_failure(exc)
        else:
            response = answer
            verdict = classify(answer.status, answer.body, answer.retry_after, self._wall_clock())
        finally:
            self.stats.in_flight -= 1
        now = self._clock()
        if response is not None:
            self._learn(response, now)
        histograms.request_seconds.observe(now - started)
        self._adapt(started, in_flight, verdict, rate_waited)
        settled = self.scheduler.resolve(batch, verdict, now)
        if self.scheduler.paused_until > max(now, self._paused_until):
            self._pause(now, self.scheduler.paused_until, verdict)
        log.debug(
            "batch",
            batch=batch.number,
            purpose=batch.purpose.value,
            contacts=len(batch.entries),
            bytes=len(body),
            status=verdict.status,
            action=verdict.action.value,
            retry_in_s=settled.retry_in_s,
        )
        if settled.fatal is not None:
            self._fatal(settled.fatal)
            return
        if verdict.action is Action.RETRY:
            delay = round(settled.retry_in_s or 0.0, 3)
            log.info(
                "retrying",
                batch=batch.number,
                attempt=batch.attempt,
                outcome=verdict.describe(),
                retry_in_s=delay,
            )
        await self._carry_out(settled)
        self._changed.notify()

    def _learn(self, response: Response, now: float) -> None:
        """``--rate auto``: move the rate from this answer (and the API's rate headers)."""
        controller, limiter = self.controller, self.limiter
        if controller is None or limiter is None:
            return
        hints = None
        if response.rate_headers:
            hints = read_hints(response.rate_headers, self._wall_clock().timestamp())
            if hints.exhausted_for_s:  # nothing left in the API's window: wait for its reset
                limiter.pause_until(now + min(hints.exhausted_for_s, self._max_pause_s))
        account = limiter.account_rate
        if account is not None and abs(account - controller.rate) > 0.01 * controller.rate:
            limiter.follow(controller.adopt(account))  # another replica moved the account's
        before = controller.rate
        if response.status == 429:
            rate = controller.throttled(now, hints)
        else:
            rate = controller.answered(now, binding=limiter.binding(now), hints=hints)
        if rate != before:
            limiter.set_rate(rate)
            log.debug("rate.adapted", rate=round(rate, 3), status=response.status)

    @property
    def _max_pause_s(self) -> float:
        return self.settings.scheduler.backoff.max_retry_after_s

    def adapt_statistics(self) -> AdaptStatistics | None:
        """``--rate auto``'s state (None with a fixed rate)."""
        return None if self.controller is None else self.controller.statistics()

    def _pause(self, now: float, until: float, verdict: Verdict) -> None:
        """The API asked every sender to wait until ``until`` (Retry-After, capped by
        --max-retry-after): the limiter holds them, then lets them out at the rate, one by one."""
        self.stats.pauses += 1
        self.stats.paused_s += until - max(now, self._paused_until)
        self._paused_until = until
        if self.limiter is not None:
            self.limiter.pause_until(until)
        length = until - now
        if length >= self.settings.pause_warn_s:
            self._long_pause_until = until
            log.warning(
                "api.paused",
                pause_s=round(length, 3),
                status=verdict.status,
                asked_s=verdict.retry_after_s,
                why="the API asked every sender to wait (Retry-After)",
            )

    def pause_from_check(self, retry_after_s: float | None) -> None:
        """The start-up check was answered with a Retry-After: the engine starts paused."""
        if retry_after_s is None:
            return
        now = self._clock()
        wait = min(retry_after_s, self._max_pause_s)
        self.scheduler.paused_until = max(self.scheduler.paused_until, now + wait)
        self._pause(now, now + wait, Verdict(Action.RETRY, 429, retry_after_s=retry_after_s))

    @property
    def paused_s(self) -> float:
        """Seconds the pause of every sender still lasts (0: none)."""
        return max(0.0, self._paused_until - self._clock())

    def _fatal(self, verdict: Verdict) -> None:
        if verdict.action is Action.FATAL_AUTH:
            message = f"the API refused the credentials or access: {verdict.describe()}"
            log.error(
                "auth failure: stopping",
                status=verdict.status,
                error=verdict.error,
                detail=verdict.detail,
            )
            self.abort(Result(Ending.AUTH, verdict, message))
        elif verdict.action is Action.FOREIGN:
            message = (
                f"stopped sending: HTTP {verdict.status}: {verdict.detail}; nothing was"
                " dead-lettered or acknowledged on account of it"
            )
            log.error(
                "api.foreign_answer",
                status=verdict.status,
                error=verdict.error,
                detail=verdict.detail,
            )
            self.abort(Result(Ending.FATAL, verdict, message))
        else:
            message = f"fatal API response: {verdict.describe()}"
            log.error(
                "fatal: stopping", status=verdict.status, error=verdict.error, detail=verdict.detail
            )
            self.abort(Result(Ending.FATAL, verdict, message))

    async def _carry_out(self, settled: Settled) -> None:
        if settled.dead:
            await self._dead_letter(settled.dead)
        if settled.applied:
            await self._ack_merged(settled.applied, settled.applied_changes)

    async def _ack_merged(self, entries: list[Entry], changes: int) -> None:
        """Acknowledge the records merged into ``entries`` (``changes`` of them), by count
        or by token, as the input acknowledges."""
        if self.source.acks_by_count:
            await self._ack_count(changes, entries)
        else:
            await self._ack(all_tokens(entries), entries)

    async def _ack_count(self, count: int, entries: list[Entry] | None) -> None:
        """Acknowledge ``count`` records to an input that acknowledges by count: nothing to
        write, only a count, so done here, without waking the acknowledger (a task switch
        per request) and without queueing the entries for it."""
        await self.source.ack_count(count)
        self.stats.acked += count
        if entries:
            self.histograms.acked(entries, count, self._clock())

    async def _ack(self, tokens: list[Hashable], entries: list[Entry] | None = None) -> None:
        """Queue these tokens for the acknowledger (``entries``, if given, are what they
        carried, for the change-to-ack histogram); wait first while its queue is full."""
        await self._wait_for_ack_room()
        self._ack_tokens += tokens
        if entries:
            self._ack_entries.append((entries, len(tokens)))
        self._ack_queued.notify()

    async def _wait_for_ack_room(self) -> None:
        while len(self._ack_tokens) >= ACK_BACKLOG:
            await self._ack_taken.wait()

    async def _acknowledge(self) -> None:
        """Acknowledge, one ``source.ack`` at a time, everything queued since the last one.

        The senders do not wait for the store's round trip: acknowledgements settled while
        one is being written go together in the next (group commit), and a sender goes on to
        its next request as soon as its answer is settled and its dead letters are written.
        """
        while True:
            if not self._ack_tokens:
                if self._producers == 0:
                    return
                await self._ack_queued.wait()
                continue
            tokens, self._ack_tokens = self._ack_tokens, []
            entries, self._ack_entries = self._ack_entries, []
            self._ack_taken.notify()
            await self.source.ack(tokens)
            self.stats.acked += len(tokens)
            now = self._clock()
            for group, changes in entries:
                self.histograms.acked(group, changes, now)

    async def _dead_letter(self, letters: list[DeadLetter]) -> None:
        at = self._wall_clock()
        records = [
            record(
                letter.reason,
                change=letter.entry.fields,
                source=self._where(letter.entry),
                status=letter.status,
                error=letter.error,
                detail=letter.detail,
                at=at,
            )
            for letter in letters
        ]
        entries = [letter.entry for letter in letters]
        await self._store_dead(records)
        await self._ack_merged(entries, changes_in(entries))

    def _where(self, entry: Entry) -> str:
        """Where an entry's changes came from: the input's names of the records kept
        (``in.jsonl:17,40``), and how many more merged between the first and the last where
        only those two are kept (``in.jsonl:17,40 (3 more merged between)``)."""
        tokens = entry.tokens
        where = self.source.describe(tokens)
        between = entry.changes - len(tokens)
        return where if between <= 0 else f"{where} ({between} more merged between)"

    async def _dead_letter_invalid(self, invalid: list[Invalid]) -> None:
        at, describe = self._wall_clock(), self.source.describe
        records = [
            record(
                "invalid",
                change=item.change,
                raw=item.raw,
                source=describe([item.token]),
                detail=item.reason,
                at=at,
            )
            for item in invalid
        ]
        await self._store_dead(records)
        if self.source.acks_by_count:
            await self._ack_count(len(invalid), None)
        else:
            await self._ack([item.token for item in invalid])

    async def _store_dead(self, records: list[dict[str, Any]]) -> None:
        """Write dead letters durably (what they carried is acknowledged only after)."""
        await self.dead_letters.write(records)
        for letter in records:
            log.info(
                "dead letter",
                reason=letter["reason"],
                source=letter["source"],
                status=letter["status"],
                error=letter["error"],
                detail=letter["detail"],
            )

    # -- reporting ---------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        """Whether the worker takes work now, and why not.

        The reasons: ``running`` (ready); ``starting`` (the engine has not started: the source
        is opened before it); ``auth`` or ``fatal`` (stopped by the API's answer);
        ``foreign_answer`` (stopped by an answer that cannot be the API's, such as a proxy's
        404 page); ``draining`` (a signal came: finishing in-flight work); ``stopped`` (the run
        is over); ``paused`` (the API asked every sender to wait, for at least
        ``pause_warn_s``: nothing is sent until the pause ends).
        """
        result = self._result
        if result is not None and result.ending in (Ending.AUTH, Ending.FATAL):
            if result.verdict is not None and result.verdict.action is Action.FOREIGN:
                return False, "foreign_answer"
            return False, result.ending.value
        if self._stopping:
            return False, "draining"
        if not self._running:
            return False, "starting" if self.stats.finished is None else "stopped"
        if self._clock() < self._long_pause_until:
            return False, "paused"
        return True, "running"

    def progress(self, since: ProgressMark | None = None) -> tuple[dict[str, Any], ProgressMark]:
        """The ``progress`` event's fields, with rates since ``since``; and the mark for next."""
        e, s = self.stats, self.scheduler.stats
        now = time.monotonic()
        mark = ProgressMark(now, e.records, e.acked, e.rate_wait_s)
        last = since or ProgressMark(e.started, 0, 0, 0.0)
        span = now - last.at
        overall = now - e.started
        rate_wait = e.rate_wait_s - last.rate_wait_s
        fields = {
            "elapsed_s": round(overall, 3),
            "records_read": e.records,
            "acked": e.acked,
            "contacts_applied": s.contacts_applied,
            "dead_letters": sum(s.dead_letters.values()) + e.invalid,
            "retries": s.retries,
            "waiting": self.scheduler.coalescer.changes_waiting,
            "in_flight": e.in_flight,
            "concurrency_limit": self.concurrency_limit,
            "read_per_s": _per_s(e.records - last.records, span),
            "acked_per_s": _per_s(e.acked - last.acked, span),
            "acked_per_s_overall": _per_s(e.acked, overall),
            "rate_wait_s": round(rate_wait, 3),
            "rate": 0.0 if self.limiter is None else round(self.limiter.rate_per_s, 2),
            "pauses": e.pauses,
            "rate_wait_share": round(rate_wait / (span * self.concurrency_limit), 3)
            if span > 0
            else 0.0,
        }
        return fields, mark

    async def _report_progress(self, interval_s: float) -> None:
        mark = None
        while True:
            await anyio.sleep(interval_s)
            fields, mark = self.progress(mark)
            log.info("progress", **fields)

    def _adaptive_summary(self) -> dict[str, Any]:
        """Under ``--concurrency auto``: the highest limit and how often it moved."""
        if self.adaptive is None:
            return {}
        a = self.adaptive.statistics()
        return {
            "concurrency_highest": a.highest,
            "concurrency_increases": a.increases,
            "concurrency_decreases": a.decreases,
            "round_trip_s": round(a.recent_rtt_s, 4),
        }

    def summary(self) -> dict[str, Any]:
        """Counters of the run so far, as plain data."""
        s, e = self.scheduler.stats, self.stats
        elapsed = e.elapsed_s
        requests = sum(s.requests.values())
        return {
            "records_read": e.records,
            "invalid": e.invalid,
            "changes": s.changes,
            "coalesced": self.scheduler.coalescer.coalesced,
            "requests": requests,
            "requests_by_status": dict(sorted(s.requests.items())),
            "isolation_requests": s.isolation_requests,
            "inferred_culprits": s.inferred_culprits,
            "retries": s.retries,
            "contacts_applied": s.contacts_applied,
            "changes_applied": s.changes_applied,
            "dead_letters": dict(s.dead_letters) | ({"invalid": e.invalid} if e.invalid else {}),
            "acked": e.acked,
            "waiting": self.scheduler.coalescer.changes_waiting,
            "in_flight": e.in_flight,
            "rate_wait_s": round(e.rate_wait_s, 3),
            "rate": 0.0 if self.limiter is None else round(self.limiter.rate_per_s, 2),
            "pauses": e.pauses,
            "paused_s": round(e.paused_s, 3),
            "concurrency_limit": self.concurrency_limit,
            **self._adaptive_summary(),
            "elapsed_s": round(elapsed, 3),
            "changes_per_s": round(e.records / elapsed, 1) if elapsed > 0 else math.nan,
        }
