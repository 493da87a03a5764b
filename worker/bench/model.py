"""The capacity model behind ``contact-worker plan``: pure arithmetic, checked by the benchmarks.

A worker drains a backlog as fast as the slowest of three limits allows:

* the API's rate: ``(requests + 1) / R``: the worker's schedule has no burst (worker.core.rate),
  and the start-up check is one request of them; the plan never counts on more than R a second;
* latency: ``requests * (latency + overhead) / concurrency``, each sender waits for its answer;
* CPU: one worker process is one core; ``changes * c_change + requests * c_request``.

How many requests: changes coalesce per ID while they wait. With at most ``max_waiting``
changes held, an ID's changes merge within a sliding window of that many changes, so a backlog
of ``N`` changes over ``n`` uniformly changed IDs needs ``n`` contact
updates when it fits in the window, else ``N n / (W + n)`` (each ID's cycle: W changes
waiting, then on average n changes until its next one). That holds when the senders are
slower than the reader (the rate binds), so the window fills. When they are not, they keep
fewer changes waiting: the reader yields to them once per slice of ``READ_SLICE`` changes,
each sender completes at most one request per slice (fewer if its answer takes longer), so a
share ``pace`` of the changes read goes out at once and ``N * pace`` updates are sent.
Updates go in batches of ``B``; fresh IDs go in groups sized for the unknown share and a refused
group is searched by generalized binary splitting as ``worker.core.grouptest`` says (expected
cost from :func:`worker.bench.bounds.requests_per_contact`, or where the steps of a search
carry riders, from the scheduler run on a sample: :func:`fresh_per_contact`); an unknown ID
seen again (within its TTL) is dead-lettered without a request, and an ID seen again that
exists is known to.
Transient errors (share ``e``) cost ``1 / (1 - e)`` attempts per request.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from worker.bench.bounds import (
    SPLITTING,
    effective_rate,
    information_bound,
    requests_per_contact,
)
from worker.core.grouptest import fresh_riders
from worker.core.scheduler import DEFAULT_MAX_WAITING

RIDER_SAMPLE = 50_000
"""Fresh IDs the scheduler is run on to price searches whose steps carry riders."""


@lru_cache(maxsize=64)
def _with_riders(batch_size: int, unknown_share: float) -> float:
    """Expected requests per fresh contact where a search's steps carry fresh riders
    (``worker.core.grouptest.fresh_riders``): a rider's 404 turns the step's search into a
    search of its pad, too entangled for a closed form, so the worker's own scheduler is run
    on :data:`RIDER_SAMPLE` fresh IDs, exactly a share ``p`` of them unknown (seeded), each
    request answered at once (``worker.bench.replay``): about 0.3 s, once per share."""
    import orjson

    from worker.bench.replay import replay  # the scheduler: only where riders are priced

    unknown = set(random.Random(1).sample(range(RIDER_SAMPLE), round(RIDER_SAMPLE * unknown_share)))
    lines = (orjson.dumps({"ID": n, "phone": ""}) for n in range(RIDER_SAMPLE))
    run = replay(lines, lambda key: int(key) not in unknown, batch_size=batch_size)
    return run.requests / RIDER_SAMPLE


def fresh_per_contact(batch_size: int, unknown_share: float, ceiling: int | None = None) -> float:
    """Expected requests per fresh contact, searches included: Hwang's splitting in closed
    form (:func:`worker.bench.bounds.requests_per_contact`), or where search steps carry
    riders, the scheduler run on a sample (:func:`_with_riders`)."""
    if unknown_share > 0 and fresh_riders(unknown_share, ceiling or batch_size):
        return _with_riders(batch_size, round(unknown_share, 6))
    return requests_per_contact(batch_size, unknown_share, SPLITTING)


CPU_US_PER_CHANGE = 10.0
"""Worker CPU per change read (decode, validate, coalesce, ack), measured on a 2-core EPYC."""
CPU_US_PER_REQUEST = 100.0
"""Worker CPU per request (body, HTTP round trip in aiohttp, bookkeeping)."""
OVERHEAD_MS = 1.0
"""Time a request takes beyond the API's latency (client, loopback, server parsing)."""
READ_US_PER_CHANGE = 6.0
"""How fast the worker reads and decodes a backlog, per change (measured)."""
READ_CHUNK_CHANGES = 5_000
"""Changes the reader decodes per read (one 256 KiB read of ~50-byte lines)."""
READ_SLICE = 1024
"""Changes the reader hands to the scheduler before it yields to the senders
(``worker.engine.READ_SLICE``)."""


@dataclass(frozen=True)
class PlanInputs:
    """What the user knows about their API, their changes and their worker settings."""

    api_rate: float
    """Requests/s the API allows; 0: no limit."""
    latency_ms: float = 20.0
    """Mean API latency."""
    batch_size: int = 100
    concurrency: int = 8
    backlog: int = 0
    """Changes waiting to be drained."""
    contacts: int | None = None
    """Distinct IDs among them; None: as many as changes (nothing coalesces)."""
    unknown_share: float = 0.0
    """Share of the distinct IDs that the API does not know."""
    changes_per_hour: float = 0.0
    """Steady inflow of changes, for requests/hour and replicas."""
    worker_rate: float = 0.0
    """The worker's own --rate; 0: set to the API's rate."""
    linger_ms: float = 200.0
    max_waiting: int = DEFAULT_MAX_WAITING
    error_rate: float = 0.0
    """Share of requests that fail transiently (5xx, timeouts) and are retried."""
    target_drain_s: float | None = None
    """Drain the backlog within this many seconds: how many replicas?"""
    cpu_us_per_change: float = CPU_US_PER_CHANGE
    cpu_us_per_request: float = CPU_US_PER_REQUEST
    overhead_ms: float = OVERHEAD_MS
    read_us_per_change: float = READ_US_PER_CHANGE

    def __post_init__(self) -> None:
        problems = []
        if self.api_rate < 0 or self.worker_rate < 0:
            problems.append("rates must be >= 0")
        if self.latency_ms < 0 or self.linger_ms < 0 or self.overhead_ms < 0:
            problems.append("latency, linger and overhead must be >= 0")
        if self.batch_size < 1 or self.concurrency < 1 or self.max_waiting < 1:
            problems.append("batch size, concurrency and max waiting must be >= 1")
        if self.backlog < 0 or self.changes_per_hour < 0:
            problems.append("backlog and changes per hour must be >= 0")
        if self.contacts is not None and not 0 <= self.contacts:
            problems.append("contacts must be >= 0")
        if self.contacts is not None and self.contacts > self.backlog > 0:
            problems.append("contacts cannot exceed the backlog (each ID needs a change)")
        if not 0.0 <= self.unknown_share < 1.0 or not 0.0 <= self.error_rate < 1.0:
            problems.append("unknown share and error rate must be in [0, 1)")
        if self.target_drain_s is not None and self.target_drain_s <= 0:
            problems.append("the target drain time must be > 0")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class Plan:
    """The model's prediction."""

    inputs: PlanInputs
    rate: float
    """Requests/s that bind (0: none)."""
    sends: float
    """Contact updates after coalescing."""
    requests_new: float
    requests_isolation: float
    requests_retry: float
    requests: float
    bound_requests: float
    """The information bound for the same contacts: no worker can do with fewer."""
    rate_s: float
    latency_s: float
    cpu_s: float
    drain_s: float
    bottleneck: str
    changes_per_s: float
    contacts_per_s: float
    requests_per_s: float
    capacity_changes_per_hour: float
    """The steady inflow one worker sustains (the backlog's drain rate)."""
    requests_per_hour: float
    """At ``changes_per_hour`` (or at capacity when that is 0)."""
    utilisation: float | None
    """Requests/s at ``changes_per_hour`` over the rate limit."""
    replicas: int | None
    replicas_note: str

    def to_json(self) -> dict[str, Any]:
        """Plain data; ``drain_s`` and ``requests`` are the headline figures."""
        data = asdict(self)
        data["inputs"] = asdict(self.inputs)
        return data


def coalesced_sends(changes: int, contacts: int, max_waiting: int, pace: float = 0.0) -> float:
    """Contact updates a backlog of ``changes`` to ``contacts`` distinct IDs needs, once the
    changes to one ID merge while they wait (within a window of ``max_waiting`` changes), and
    the senders send a share ``pace`` of the changes as they are read (:func:`sender_pace`)."""
    if changes <= 0 or contacts <= 0:
        return 0.0
    window = contacts if changes <= max_waiting else changes * contacts / (max_waiting + contacts)
    return min(float(changes), max(float(contacts), window, changes * pace))


def sender_pace(inputs: PlanInputs, rate: float) -> float:
    """Updates sent per change read while a backlog is being read, when nothing else holds the
    senders back: each of them completes one request per reader slice at most (the reader
    does not yield within one), fewer when its round trip outlasts the slice, and never more
    than the rate limit allows."""
    slice_s = READ_SLICE * inputs.read_us_per_change / 1e6
    round_trip = (inputs.latency_ms + inputs.overhead_ms) / 1000
    requests = inputs.concurrency * (min(1.0, slice_s / round_trip) if round_trip > 0 else 1.0)
    if rate:
        requests = min(requests, rate * slice_s)
    return min(1.0, requests * inputs.batch_size / READ_SLICE)


def early_sends(inputs: PlanInputs, contacts: float, rate: float) -> float:
    """Updates sent again because their batch left before the rest of the backlog was read.

    A full batch goes at once, also while the backlog is still being read, at most ``R`` a
    second (the schedule has no burst: worker.core.rate), fewer when answers come back slower
    (the reader, busy decoding chunks, slows them down). An
    ID whose batch left when a share ``f`` of the backlog was read goes again if it changes in
    the rest: with probability ``1 - e^(-m (1 - f))``, ``m`` its changes beyond the first.
    """
    changes = inputs.backlog
    more = changes / contacts - 1 if contacts else 0.0
    if not rate or more <= 0 or changes > inputs.max_waiting:
        return 0.0  # no burst, nothing to send again, or the window formula covers it
    fill_s = changes * inputs.read_us_per_change / 1e6
    chunk_s = READ_CHUNK_CHANGES * inputs.read_us_per_change / 1e6
    round_trip = (inputs.latency_ms + inputs.overhead_ms) / 1000 + chunk_s / 2
    answers = inputs.concurrency / round_trip
    per_batch = inputs.batch_size * fresh_per_contact(inputs.batch_size, inputs.unknown_share)
    steps = 200
    dt = fill_s / steps
    # No burst: what the schedule allows accumulates for one step at most.
    tokens, sent, again = 1.0, 0.0, 0.0
    for step in range(1, steps + 1):
        f = step / steps
        tokens = min(max(1.0, rate * dt), tokens + rate * dt)
        readable = contacts * -math.expm1(-changes * f / contacts) / inputs.batch_size - sent
        batches = max(0.0, min(answers * dt, tokens) / per_batch)
        batches = min(batches, max(0.0, readable))
        tokens -= batches * per_batch
        sent += batches
        again += batches * inputs.batch_size * -math.expm1(-more * (1 - f))
    return again


def _requests(sends: float, distinct: float, inputs: PlanInputs, fill: float) -> tuple[float, ...]:
    """(new, isolation, retry) requests for ``sends`` updates to ``distinct`` IDs."""
    p = inputs.unknown_share
    # An ID is learnt at its first update: seen again (within the TTL) it is known to exist
    # (and goes in full batches) or known missing (dead-lettered without a request).
    fresh = min(sends, distinct)
    known = (1.0 - p) * max(0.0, sends - distinct)
    size = max(1, round(fill))
    searched = fresh * fresh_per_contact(size, p, inputs.batch_size) if fresh > 0 else 0.0
    fresh_batches = math.ceil(fresh / fill) if fresh > 0 else 0
    known_batches = math.ceil(known / fill) if known > 0 else 0
    new = float(fresh_batches + known_batches)
    isolation = max(0.0, searched - fresh_batches)
    retry = (new + isolation) * inputs.error_rate / (1.0 - inputs.error_rate)
    return new, isolation, retry


@dataclass(frozen=True)
class _Drain:
    """What draining one backlog takes."""

    sends: float
    new: float
    isolation: float
    retry: float
    limits: dict[str, float]
    drain_s: float

    @property
    def requests(self) -> float:
        """All requests: new, isolating, retried."""
        return self.new + self.isolation + self.retry

    @property
    def bottleneck(self) -> str:
        """The limit that binds."""
        return max(self.limits, key=lambda k: self.limits[k])


def _drain(inputs: PlanInputs, backlog: int, contacts: int, rate: float) -> _Drain:
    """Requests and time to drain ``backlog`` changes to ``contacts`` distinct IDs."""
    sends = coalesced_sends(backlog, contacts, inputs.max_waiting, sender_pace(inputs, rate))
    if backlog == inputs.backlog:
        sends = min(float(backlog), sends + early_sends(inputs, contacts, rate))
    new, isolation, retry = _requests(sends, contacts, inputs, inputs.batch_size)
    requests = new + isolation + retry
    per_request = (inputs.latency_ms + inputs.overhead_ms) / 1000
    # No burst (worker.core.rate): every request, the start-up check's too, takes its slot.
    cpu_us = backlog * inputs.cpu_us_per_change + requests * inputs.cpu_us_per_request
    limits = {
        "api_rate": (requests + 1.0) / rate if rate else 0.0,
        "latency": requests * per_request / inputs.concurrency,
        "cpu": cpu_us / 1e6,
    }
    drain = max(limits.values()) + (per_request if requests else 0.0)
    return _Drain(sends, new, isolation, retry, limits, drain)


def plan(inputs: PlanInputs) -> Plan:
    """Predict throughput, requests, drain time and replicas."""
    rate = effective_rate(inputs.worker_rate or inputs.api_rate, inputs.api_rate)
    n = inputs.backlog if inputs.contacts is None else inputs.contacts
    backlog = _drain(inputs, inputs.backlog, n, rate)
    # What one worker sustains: a backlog's drain rate, or an hour's inflow drained at once.
    volume = inputs.changes_per_hour
    reference = backlog
    if not inputs.backlog and volume > 0:
        reference = _drain(inputs, math.ceil(volume), math.ceil(volume), rate)
    reference_changes = inputs.backlog or math.ceil(volume)
    capacity = reference_changes / reference.drain_s * 3600 if reference.drain_s else 0.0
    per_hour, utilisation = _steady(inputs, rate, backlog.requests, backlog.drain_s)
    replicas, note = _replicas(inputs, backlog, reference, rate, capacity)
    drain = backlog.drain_s
    return Plan(
        inputs=inputs,
        rate=rate,
        sends=backlog.sends,
        requests_new=backlog.new,
        requests_isolation=backlog.isolation,
        requests_retry=backlog.retry,
        requests=backlog.requests,
        bound_requests=information_bound(round(n), inputs.unknown_share, inputs.batch_size),
        rate_s=backlog.limits["api_rate"],
        latency_s=backlog.limits["latency"],
        cpu_s=backlog.limits["cpu"],
        drain_s=drain,
        bottleneck=backlog.bottleneck if inputs.backlog else reference.bottleneck,
        changes_per_s=inputs.backlog / drain if drain else 0.0,
        contacts_per_s=backlog.sends / drain if drain else 0.0,
        requests_per_s=backlog.requests / drain if drain else 0.0,
        capacity_changes_per_hour=capacity,
        requests_per_hour=per_hour,
        utilisation=utilisation,
        replicas=replicas,
        replicas_note=note,
    )


def _steady(
    inputs: PlanInputs, rate: float, requests: float, drain: float
) -> tuple[float, float | None]:
    """Requests/hour for the steady inflow, and the share of the rate limit they use."""
    volume = inputs.changes_per_hour
    if volume <= 0:
        per_hour = requests / drain * 3600 if drain > 0 else 0.0
        return per_hour, (per_hour / 3600 / rate) if rate else None
    arrivals = volume / 3600
    # A batch goes when full or when its oldest change has lingered: 1 + arrivals in linger.
    fill = min(float(inputs.batch_size), 1.0 + arrivals * inputs.linger_ms / 1000)
    new, isolation, retry = _requests(volume, volume, inputs, fill)
    per_hour = new + isolation + retry
    if rate and per_hour > rate * 3600:  # never planned above R: the backlog grows instead
        per_hour = rate * 3600
    return per_hour, (per_hour / 3600 / rate) if rate else None


def _replicas(
    inputs: PlanInputs, backlog: _Drain, reference: _Drain, rate: float, capacity: float
) -> tuple[int | None, str]:
    """Replicas (each with rate/replicas and its share of the IDs) to meet the target."""
    target = inputs.target_drain_s
    volume = inputs.changes_per_hour
    if target is None and volume <= 0:
        return 1, "no target given: one worker"
    # The API's rate limit is the account's: replicas share it, only latency and CPU scale.
    if target is not None and inputs.backlog:
        limits = backlog.limits
        budget = target - (inputs.latency_ms + inputs.overhead_ms) / 1000
        if budget <= 0 or limits["api_rate"] > budget:
            return None, (
                f"unreachable: the API rate limit alone needs {limits['api_rate']:.0f} s; "
                "fewer requests (batch size, --max-waiting) or a higher limit could"
            )
        count = max(1, math.ceil(max(limits["latency"], limits["cpu"]) / budget))
        return count, (
            f"{count} worker(s), IDs partitioned by hash, sharing --rate {rate:g} through"
            " their redis:// or postgresql:// input"
        )
    if volume <= 0 or capacity <= 0:
        return 1, "nothing to drain"
    if volume <= capacity:
        return 1, f"one worker keeps up with {volume:,.0f} changes/hour"
    limits = reference.limits
    if rate and limits["api_rate"] >= max(limits["latency"], limits["cpu"]):
        return None, (
            f"unreachable: the API rate limit caps the account at {capacity:,.0f} changes/hour "
            f"(at batch size {inputs.batch_size}); more workers do not help"
        )
    count = max(1, math.ceil(volume / capacity))
    return count, f"{count} worker(s) for {volume:,.0f} changes/hour, IDs partitioned by hash"
