"""The core promises (DESIGN 1-5), checked with hypothesis against a small model of the API.

A generated stream of changes is fed to a real :class:`Scheduler` in chunks, interleaved with
requests handed out (several outstanding at once) and completed in a hypothesis-chosen order,
on a fake clock. The model API answers each request; its status and body go through the real
classifier. At the end every promise is checked against what the model saw.
"""

from __future__ import annotations

import datetime
import email.utils
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.unit.factories import NOT_FOUND_BODY
from worker.core.backoff import Backoff
from worker.core.batch import Batch, BatchLimits, Purpose
from worker.core.change import Change
from worker.core.classify import Verdict, classify, classify_failure
from worker.core.coalesce import changes_in
from worker.core.scheduler import Scheduler, SchedulerSettings

EPOCH_WALL = datetime.datetime(2026, 11, 26, 14, 0, 0, tzinfo=datetime.UTC)
"""The wall clock at fake time 0."""

TEXT_FIELDS = ("lastname", "firstname", "extra1", "extra2")
TRANSIENTS = ("503", "429-seconds", "429-date", "105", "timeout", "lost", "late")
"""Transient failures the model can inject; ``lost`` is applied, but the answer never comes;
``late`` times out, and the API applies it later anyway (within the timeout grace)."""

LATE_S = (0.05, 0.5, 3.0)
"""How long after its timeout the API applies a ``late`` request."""
TIMEOUT_GRACE_S = 5.0


def wall(now: float) -> datetime.datetime:
    """The wall clock at fake time ``now``."""
    return EPOCH_WALL + datetime.timedelta(seconds=now)


@dataclass
class ModelApi:
    """The API as DESIGN describes it: all or nothing per request, 404 if any ID is unknown."""

    unknown: frozenset[str]
    max_array: int | None
    state: dict[str, dict[str, Any]] = field(default_factory=dict)
    applied_seqs: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    """Per (ID, field), the sequence numbers written, in the order they were written."""
    newest_seqs: dict[str, list[int]] = field(default_factory=dict)
    """Per ID, the newest sequence number in each object written for it, in order."""
    reached: set[object] = field(default_factory=set)
    """Tokens of every change the API has applied."""

    def answer(self, batch: Batch) -> tuple[int, bytes]:
        """The status and body for one request; applies it when it is answered 204."""
        objs = orjson.loads(batch.body())
        assert isinstance(objs, list)
        if self.max_array is not None and len(objs) > self.max_array:
            return 413, b""
        if any(str(obj["ID"]) in self.unknown for obj in objs):
            return 404, NOT_FOUND_BODY
        self.apply(batch, objs)
        return 204, b""

    def answer_late(self, batch: Batch, objs: list[dict[str, Any]]) -> None:
        """A request the client gave up on, reaching the API now: applied unless refused."""
        if self.max_array is not None and len(objs) > self.max_array:
            return
        if any(str(obj["ID"]) in self.unknown for obj in objs):
            return
        self.apply(batch, objs)

    def apply(self, batch: Batch, objs: list[dict[str, Any]]) -> None:
        """Write every object, in order."""
        for obj, entry in zip(objs, batch.entries, strict=True):
            key = str(obj["ID"])
            fields = {name: value for name, value in obj.items() if name != "ID"}
            self.state.setdefault(key, {}).update(fields)
            for name, value in fields.items():
                self.applied_seqs.setdefault((key, name), []).append(int(value))
            self.newest_seqs.setdefault(key, []).append(max(int(v) for v in fields.values()))
            self.reached.update(entry.tokens)


@st.composite
def streams(draw: st.DrawFn, pool: int) -> list[Change]:
    """Changes to IDs 1..pool with 1-3 fields, each value the change's per-ID sequence number."""
    size = draw(st.integers(1, 40), label="stream size")
    raw = draw(
        st.lists(
            st.tuples(
                st.integers(1, pool),
                st.booleans(),
                st.sets(st.sampled_from(TEXT_FIELDS), min_size=1, max_size=3),
            ),
            min_size=size,
            max_size=size,
        )
    )
    seqs: Counter[int] = Counter()
    out = []
    for token, (id_, as_int, names) in enumerate(raw):
        seqs[id_] += 1
        fields = {name: str(seqs[id_]) for name in sorted(names)}
        out.append(Change(str(id_), {"ID": id_ if as_int else str(id_), **fields}, token))
    return out


@dataclass
class Run:
    """One driven run: the scheduler, the model, and what was settled."""

    scheduler: Scheduler
    api: ModelApi
    stream: list[Change]
    settled_applied: list[object] = field(default_factory=list)
    settled_dead: list[tuple[object, str]] = field(default_factory=list)
    requests: int = 0
    most_outstanding: int = 0
    late: list[tuple[float, Batch, list[dict[str, Any]]]] = field(default_factory=list)
    """Requests given up on by the client that the API will still apply, and when."""

    def apply_late(self, until: float) -> None:
        """Let the API apply the late requests due by ``until``, in time order."""
        self.late.sort(key=lambda item: item[0])
        while self.late and self.late[0][0] <= until:
            _, batch, objs = self.late.pop(0)
            self.api.answer_late(batch, objs)


@dataclass(frozen=True)
class Shape:
    """The ranges a run's settings are drawn from."""

    pool: tuple[int, int] = (1, 6)
    unknown: tuple[int, int] = (0, 2)
    max_items: tuple[int, int] = (1, 6)
    max_waiting: tuple[int, int] = (1, 12)
    linger_s: tuple[float, ...] = (0.0, 0.1, 0.5)
    max_array: st.SearchStrategy[int | None] = st.one_of(st.none(), st.integers(1, 3))
    transients: bool = False


def drive(data: st.DataObject, shape: Shape) -> Run:
    """Feed a generated stream through a Scheduler against the model, checking as it goes."""
    pool = data.draw(st.integers(*shape.pool), label="pool")
    low, high = shape.unknown
    unknown = data.draw(st.sets(st.integers(1, pool), min_size=low, max_size=high), label="unknown")
    stream = data.draw(streams(pool), label="stream")
    concurrency = data.draw(st.integers(1, 4), label="concurrency")
    limits = BatchLimits(
        max_items=data.draw(st.integers(*shape.max_items), label="max_items"),
        max_bytes=data.draw(st.sampled_from([1 << 20, 120, 60]), label="max_bytes"),
        linger_s=data.draw(st.sampled_from(shape.linger_s), label="linger_s"),
    )
    options = SchedulerSettings(
        limits=limits,
        backoff=Backoff(base_s=0.1, cap_s=2.0),
        max_waiting=data.draw(st.integers(*shape.max_waiting), label="max_waiting"),
        suspect_ttl_s=data.draw(st.sampled_from([0.05, 1.0, 100.0]), label="suspect_ttl_s"),
        # 0: every lone 404 dead at once; 50: held for a 2xx (never reached: <= 40 changes).
        max_not_found_run=data.draw(st.sampled_from([0, 50]), label="max_not_found_run"),
        timeout_grace_s=TIMEOUT_GRACE_S,
    )
    budget = data.draw(st.integers(0, 8), label="transient budget") if shape.transients else 0
    max_array = data.draw(shape.max_array, label="max_array")
    api = ModelApi(frozenset(str(i) for i in unknown), max_array)
    seed = data.draw(st.integers(0, 2**32 - 1), label="jitter seed")
    scheduler = Scheduler(options, rand=random.Random(seed).random)
    run = Run(scheduler, api, stream)

    now = 0.0
    fed = 0
    outstanding: list[Batch] = []
    for _ in range(5000):
        if fed == len(stream):
            scheduler.draining = True  # a finite input has reached its end
        wake: float | None = None
        # Hand out up to `concurrency` requests, as the engine's senders would.
        while len(outstanding) < concurrency:
            handed = scheduler.next_batch(now)
            if not isinstance(handed, Batch):
                wake = handed
                break
            check_handed_out(handed, outstanding, scheduler)
            outstanding.append(handed)
            run.most_outstanding = max(run.most_outstanding, len(outstanding))
        # As the engine does before it waits: lone 404s nothing can confirm any more.
        due = scheduler.settle_due(now)
        if due is not None and (due.applied or due.dead):
            assert (
                changes_in(due.applied)
                == due.applied_changes
                == sum(e.changes for e in due.applied)
            )
            run.settled_applied += [t for e in due.applied for t in e.tokens]
            run.settled_dead += [(t, d.reason) for d in due.dead for t in d.entry.tokens]
            continue
        # Feed a chunk from the source, as far as there is room.
        added = 0
        if fed < len(stream):
            chunk = data.draw(st.integers(0, 6), label="chunk")
            if not outstanding and wake is None:
                chunk = max(chunk, 1)
            while added < chunk and fed < len(stream) and scheduler.has_room:
                scheduler.add(stream[fed], now)
                fed += 1
                added += 1
        # Complete one of the outstanding requests (or let more pile up), let time pass, or stop.
        pile_up = (
            fed < len(stream)
            and len(outstanding) < concurrency
            and data.draw(st.booleans(), label="wait for more?")
        )
        if outstanding and not pile_up:
            batch = outstanding.pop(data.draw(st.integers(0, len(outstanding) - 1), label="which"))
            failure = None
            if budget and data.draw(st.booleans(), label="fail?"):
                budget -= 1
                failure = data.draw(st.sampled_from(TRANSIENTS), label="failure")
            verdict = respond(run, batch, failure, now)
            run.requests += 1
            settled = scheduler.resolve(batch, verdict, now)
            assert None is settled.fatal
            assert settled.applied_changes == sum(e.changes for e in settled.applied)
            run.settled_applied += [t for e in settled.applied for t in e.tokens]
            run.settled_dead += [(t, d.reason) for d in settled.dead for t in d.entry.tokens]
            now += data.draw(st.sampled_from([0.0, 0.01, 0.2]), label="dt")
            run.apply_late(now)
        elif added or pile_up:
            continue
        elif isinstance(wake, float):
            assert wake > now, "asked to wait for a time already reached"
            now = wake
            run.apply_late(now)
        else:
            assert fed == len(stream), "nothing to do while the source still has changes"
            break
    else:
        raise AssertionError("the run did not end")
    run.apply_late(float("inf"))  # a slow server applies what it still holds, however late
    stats = scheduler.stats
    # What the run went through (pytest --hypothesis-show-statistics).
    event(f"most requests outstanding at once: {min(run.most_outstanding, 3)}+")
    for name, count in [
        ("isolation request", stats.requests_by_purpose["isolate"]),
        ("known missing dead-lettered at once", stats.known_missing),
        ("inferred culprit", stats.inferred_culprits),
        ("rider", stats.riders),
        ("shrink", stats.shrinks),
        ("retry", stats.retries),
        ("fenced ID", stats.fenced),
        ("coalesced change", scheduler.coalescer.coalesced),
    ]:
        event(f"{name}: {'yes' if count else 'no'}")
    return run


def respond(run: Run, batch: Batch, failure: str | None, now: float) -> Verdict:
    """The verdict of one request: the model's answer through the real classifier."""
    api = run.api
    now_wall = wall(now)
    if failure is None:
        status, body = api.answer(batch)
        return classify(status, body, None, now_wall)
    if failure == "503":
        return classify(503, b"<html>Service Unavailable</html>", None, now_wall)
    if failure == "429-seconds":
        return classify(429, b"", "1", now_wall)
    if failure == "429-date":
        later = now_wall.replace(microsecond=0) + datetime.timedelta(seconds=2)
        return classify(429, b"", email.utils.format_datetime(later, usegmt=True), now_wall)
    if failure == "105":
        return classify(400, b'{"error":"105","errorMsg":"Server issues"}', None, now_wall)
    if failure == "lost":
        status, _ = api.answer(batch)  # maybe applied; the answer is lost on the way back
        return classify_failure(ConnectionResetError(f"lost a {status}"))
    if failure == "late":
        objs = orjson.loads(batch.body())
        assert isinstance(objs, list)
        run.late.append((now + LATE_S[len(run.late) % len(LATE_S)], batch, objs))
    return classify_failure(TimeoutError())


def check_handed_out(batch: Batch, outstanding: list[Batch], scheduler: Scheduler) -> None:
    """(3) no request holds an ID twice; (4) no ID is in two outstanding requests."""
    keys = batch.keys
    assert batch.entries, "an empty request"
    assert len(keys) == len(set(keys)), f"an ID twice in one request: {keys}"
    assert keys == [str(obj["ID"]) for obj in orjson.loads(batch.body())]
    busy = {key for other in outstanding for key in other.keys}
    assert not busy & set(keys), f"IDs in two outstanding requests: {sorted(busy & set(keys))}"
    if batch.purpose is Purpose.NEW and batch.attempt == 0:  # a retry keeps its entries
        assert len(keys) <= scheduler.ceiling


def check_promises(run: Run) -> None:
    """The end state: everything applied or dead-lettered once, in order, as merged."""
    api, stream, scheduler = run.api, run.stream, run.scheduler
    known = [c for c in stream if c.key not in api.unknown]
    doomed = [c for c in stream if c.key in api.unknown]

    # (1) every known ID ends with exactly the merged last-written values of its changes.
    expected: dict[str, dict[str, Any]] = {}
    for change in known:
        expected.setdefault(change.key, {}).update(
            {k: v for k, v in change.fields.items() if k != "ID"}
        )
    assert expected == api.state

    # (2) every change of an unknown ID is dead-lettered as not_found; nothing else is.
    assert Counter((c.token, "not_found") for c in doomed) == Counter(run.settled_dead)
    assert not api.unknown & set(api.state)

    # (3) and the first half of (4) were checked as each request was handed out.
    # (4) the sequence numbers written per ID, and per ID and field, never go backwards.
    for key, seqs in api.newest_seqs.items():
        assert seqs == sorted(seqs), f"ID {key} written out of order: {seqs}"
    for (key, name), seqs in api.applied_seqs.items():
        assert seqs == sorted(seqs), f"ID {key} field {name} written out of order: {seqs}"

    # (5) every token settled exactly once; applied only if the API really applied it.
    settled = Counter(run.settled_applied) + Counter(t for t, _ in run.settled_dead)
    assert {c.token: 1 for c in stream} == dict(settled)
    assert set(run.settled_applied) <= api.reached
    assert scheduler.idle
    assert None is scheduler.fatal
    stats = scheduler.stats
    assert (len(stream), len(stream)) == (
        stats.changes,
        stats.changes_applied + sum(stats.dead_letters.values()),
    )
    assert scheduler.coalescer.ids_in_flight == 0
    assert scheduler.coalescer.changes_waiting == 0


@pytest.mark.slow
class TestCorePromises:
    """The promises of DESIGN 1-5 over generated streams, interleavings and answers."""

    @settings(
        max_examples=400,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def test_promises_hold_with_a_faithful_api(self, data: st.DataObject) -> None:
        """With 204/404/413 answers only: known IDs end as merged, unknown ones dead as
        not_found, no ID twice per request or in two requests, order kept, all settled once."""
        check_promises(drive(data, Shape()))

    @settings(
        max_examples=400,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def test_promises_hold_through_transient_failures(self, data: st.DataObject) -> None:
        """The same promises with 5xx, 429 (Retry-After in seconds or as a date), code 105,
        timeouts and lost answers (applied, but the answer never came) mixed in."""
        check_promises(drive(data, Shape(transients=True)))

    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def test_promises_hold_while_isolating(self, data: st.DataObject) -> None:
        """The same promises when unknown IDs hide in large batches: isolation, inferred
        culprits and suspects under concurrency, with transient failures mixed in."""
        shape = Shape(
            pool=(3, 8),
            unknown=(1, 3),
            max_items=(3, 8),
            max_waiting=(8, 20),
            linger_s=(0.5,),
            max_array=st.none(),
            transients=True,
        )
        check_promises(drive(data, shape))
