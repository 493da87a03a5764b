"""The capacity model behind ``contact-worker plan``: pure arithmetic, checked by the benchmarks.

A worker drains a backlog as fast as the slowest of three limits allows:

* the API's rate: ``requests / R`` (the token bucket starts full: the first R are free);
* latency: ``requests * (latency + overhead) / concurrency``, each sender waits for its answer;
* CPU: one worker process is one core; ``changes * c_change + requests * c_request``.

How many requests: changes coalesce per ID while they wait. With at most ``max_waiting``
changes held, an ID's changes merge within a sliding window of that many changes, so a backlog
of ``N`` changes over ``n`` uniformly changed IDs needs about ``n (1 - e^(-N/n))`` contact
updates when it fits in the window, else ``N n / (W + n)``. Updates go in batches of ``B``;
a batch holding an unknown ID is halved as ``worker.core.split`` does (expected cost from
:func:`worker.bench.bounds.expected_requests`); an unknown ID seen again is sent alone.
Transient errors (share ``e``) cost ``1 / (1 - e)`` attempts per request.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from worker.bench.bounds import effective_rate, expected_requests, information_bound

CPU_US_PER_CHANGE = 10.0
"""Worker CPU per change read (decode, validate, coalesce, ack), measured on a 2-core EPYC."""
CPU_US_PER_REQUEST = 100.0
"""Worker CPU per request (body, HTTP round trip in aiohttp, bookkeeping)."""
OVERHEAD_MS = 1.0
"""Time a request takes beyond the API's latency (client, loopback, server parsing)."""


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
    max_waiting: int = 50_000
    error_rate: float = 0.0
    """Share of requests that fail transiently (5xx, timeouts) and are retried."""
    target_drain_s: float | None = None
    """Drain the backlog within this many seconds: how many replicas?"""
    cpu_us_per_change: float = CPU_US_PER_CHANGE
    cpu_us_per_request: float = CPU_US_PER_REQUEST
    overhead_ms: float = OVERHEAD_MS

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


def coalesced_sends(changes: int, contacts: int, max_waiting: int) -> float:
    """Contact updates a backlog needs once changes to one ID merge while they wait."""
    if changes <= 0 or contacts <= 0:
        return 0.0
    appearing = contacts * -math.expm1(-changes / contacts)
    if changes <= max_waiting:
        return appearing
    return max(appearing, changes * contacts / (max_waiting + contacts))


def _requests(sends: float, distinct: float, inputs: PlanInputs, fill: float) -> tuple[float, ...]:
    """(new, isolation, retry) requests for ``sends`` updates to ``distinct`` IDs."""
    p = inputs.unknown_share
    # An unknown ID is found once; seen again (within the suspect TTL) it goes alone.
    alone = p * max(0.0, sends - distinct)
    batched = sends - alone
    batches = math.ceil(batched / fill) if batched > 0 else 0
    share = min(1.0, p * distinct / batched) if batched > 0 else 0.0
    size = max(1, round(fill))
    per_batch = expected_requests(size, share) if batches else 0.0
    new = float(batches + alone)
    isolation = batches * (per_batch - 1.0)
    retry = (new + isolation) * inputs.error_rate / (1.0 - inputs.error_rate)
    return new, isolation, retry


def plan(inputs: PlanInputs) -> Plan:
    """Predict throughput, requests, drain time and replicas."""
    rate = effective_rate(inputs.worker_rate or inputs.api_rate, inputs.api_rate)
    n = inputs.backlog if inputs.contacts is None else inputs.contacts
    sends = coalesced_sends(inputs.backlog, n, inputs.max_waiting)
    distinct = n * -math.expm1(-inputs.backlog / n) if n else 0.0
    new, isolation, retry = _requests(sends, distinct, inputs, inputs.batch_size)
    requests = new + isolation + retry
    latency = inputs.latency_ms / 1000
    per_request = latency + inputs.overhead_ms / 1000
    limits = {
        "api_rate": max(0.0, requests - rate) / rate if rate else 0.0,
        "latency": requests * per_request / inputs.concurrency,
        "cpu": (inputs.backlog * inputs.cpu_us_per_change + requests * inputs.cpu_us_per_request)
        / 1e6,
    }
    bottleneck = max(limits, key=lambda k: limits[k])
    drain = limits[bottleneck] + (per_request if requests else 0.0)
    capacity = inputs.backlog / drain * 3600 if drain > 0 else 0.0
    per_hour, utilisation = _steady(inputs, rate, capacity, requests, drain)
    replicas, note = _replicas(inputs, limits, rate, capacity, per_request)
    return Plan(
        inputs=inputs,
        rate=rate,
        sends=sends,
        requests_new=new,
        requests_isolation=isolation,
        requests_retry=retry,
        requests=requests,
        bound_requests=information_bound(round(n), inputs.unknown_share, inputs.batch_size),
        rate_s=limits["api_rate"],
        latency_s=limits["latency"],
        cpu_s=limits["cpu"],
        drain_s=drain,
        bottleneck=bottleneck,
        changes_per_s=inputs.backlog / drain if drain else 0.0,
        contacts_per_s=sends / drain if drain else 0.0,
        requests_per_s=requests / drain if drain else 0.0,
        capacity_changes_per_hour=capacity,
        requests_per_hour=per_hour,
        utilisation=utilisation,
        replicas=replicas,
        replicas_note=note,
    )


def _steady(
    inputs: PlanInputs, rate: float, capacity: float, requests: float, drain: float
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
    return per_hour, (per_hour / 3600 / rate) if rate else None


def _replicas(
    inputs: PlanInputs,
    limits: dict[str, float],
    rate: float,
    capacity: float,
    per_request: float,
) -> tuple[int | None, str]:
    """Replicas (each with rate/replicas and its share of the IDs) to meet the target."""
    target = inputs.target_drain_s
    volume = inputs.changes_per_hour
    if target is None and volume <= 0:
        return 1, "no target given: one worker"
    # The API's rate limit is the account's: replicas share it, only latency and CPU scale.
    scalable = max(limits["latency"], limits["cpu"])
    if target is not None:
        budget = target - per_request
        if budget <= 0 or limits["api_rate"] > budget:
            return None, (
                f"unreachable: the API rate limit alone needs {limits['api_rate']:.0f} s; "
                "raise the batch size or the API's limit"
            )
        count = max(1, math.ceil(scalable / budget))
        return count, f"{count} worker(s), IDs partitioned by hash, --rate {rate / count:g} each"
    sustained = capacity
    if sustained <= 0:
        return 1, "nothing to drain"
    if rate and limits["api_rate"] >= scalable:
        return None if volume > capacity else 1, (
            "bound by the API's rate limit: more workers do not help"
            if volume > capacity
            else "one worker keeps up"
        )
    count = max(1, math.ceil(volume / sustained))
    return count, f"{count} worker(s) for {volume:,.0f} changes/hour"
