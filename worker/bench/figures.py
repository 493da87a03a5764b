"""What a benchmark's numbers mean: input facts, limits, per-run figures, goals. Pure.

The harness hands in what it measured (counters, times, histograms); this module turns them
into the figures of the report and compares each with its limit.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from worker.bench.bounds import (
    INFERRED,
    PLAIN,
    SPLITTING,
    binary_entropy,
    effective_rate,
    information_bound,
    ratio,
    requests_needed,
    requests_per_contact,
)
from worker.bench.histogram import Histogram
from worker.bench.model import Plan, PlanInputs, plan
from worker.bench.scenario import Variant
from worker.core.change import Change, decode
from worker.sim.latency import parse_latency

TIME_GOAL_DEFAULT = 1 / 0.9


@dataclass(frozen=True)
class InputFacts:
    """What an input holds, counted the way the worker validates it."""

    lines: int
    changes: int
    """Valid changes."""
    invalid: int
    contacts: int
    """Distinct IDs among the valid changes."""
    unknown: int
    """Distinct IDs the API does not know."""

    @property
    def unknown_share(self) -> float:
        """Share of the distinct IDs that are unknown."""
        return self.unknown / self.contacts if self.contacts else 0.0

    def to_json(self) -> dict[str, Any]:
        """Plain data, the share included."""
        return asdict(self) | {"unknown_share": self.unknown_share}


def known_below(known_count: int) -> Callable[[str], bool]:
    """The simulator's rule for ``--known-count N``: exactly "1".."N" exist."""
    return lambda key: key.isdigit() and key[0] != "0" and int(key) <= known_count


def facts_of(lines: Iterable[bytes], known_count: int) -> InputFacts:
    """Count lines, valid changes and distinct (unknown) IDs; known IDs are "1".."known_count"."""
    count = changes = 0
    ids: set[str] = set()
    for line in lines:
        count += 1
        item = decode(line.rstrip(b"\r\n"), count)
        if type(item) is Change:
            changes += 1
            ids.add(item.key)
    is_known = known_below(known_count)
    unknown = sum(1 for key in ids if not is_known(key))
    return InputFacts(count, changes, count - changes, len(ids), unknown)


@dataclass(frozen=True)
class LatencyFacts:
    """The mean API latency a variant's spec gives, cut off at the request timeout."""

    mean_ms: float
    timeout_share: float
    """Share of requests that outlast the worker's request timeout (and are retried)."""


def latency_facts(spec: str, timeout_s: float, samples: int = 20_000) -> LatencyFacts:
    """Estimate the latency figures of a spec by sampling it (seeded: always the same)."""
    sampler = parse_latency(spec)
    rng = random.Random(7)
    draws = [sampler(rng) for _ in range(samples)]
    cut = [min(d, timeout_s) for d in draws]
    late = sum(1 for d in draws if d > timeout_s)
    return LatencyFacts(1000 * sum(cut) / samples, late / samples)


@dataclass(frozen=True)
class Limits:
    """The limits one input is measured against."""

    contacts: int
    unknown_share: float
    batch_size: int
    rate: float
    """Requests/s that bind; 0: none."""
    requests_needed: int
    """The information bound in whole requests: max(n / B, n H(p))."""
    rate_s: float | None
    """The time the rate allows: requests needed / rate."""
    arrival_s: float | None
    """How long the input takes to arrive (streams only)."""
    bound_per_contact: float
    plain_halving_per_contact: float
    worker_halving_per_contact: float
    """Halving that does not send the half known to hold a culprit (the worker before
    generalized binary splitting)."""
    splitting_per_contact: float
    """Generalized binary splitting, as the worker does it now (worker.core.grouptest)."""

    @property
    def limit_s(self) -> float | None:
        """The least time: the rate's, or the arrival's for a stream."""
        known = [t for t in (self.rate_s, self.arrival_s) if t is not None]
        return max(known) if known else None

    def to_json(self) -> dict[str, Any]:
        """Plain data, with the least time."""
        return asdict(self) | {
            "limit_s": self.limit_s,
            "entropy": binary_entropy(self.unknown_share),
        }


def limits_of(facts: InputFacts, variant: Variant) -> Limits:
    """The limits for ``facts`` under the variant's rate and batch size."""
    n, p, size = facts.contacts, facts.unknown_share, variant.worker.batch_size
    rate = effective_rate(variant.worker.rate, variant.api.rate_limit)
    needed = requests_needed(n, p, size)
    arrival = variant.stream.arrival_rate
    return Limits(
        contacts=n,
        unknown_share=p,
        batch_size=size,
        rate=rate,
        requests_needed=needed,
        rate_s=needed / rate if rate else None,
        arrival_s=facts.lines / arrival if arrival else None,
        bound_per_contact=information_bound(n, p, size) / n if n else 0.0,
        plain_halving_per_contact=requests_per_contact(size, p, PLAIN),
        worker_halving_per_contact=requests_per_contact(size, p, INFERRED),
        splitting_per_contact=requests_per_contact(size, p, SPLITTING),
    )


def _get(data: Mapping[str, Any], key: str) -> float:
    value = data.get(key, 0)
    return float(value) if isinstance(value, int | float) else 0.0


def run_figures(
    who: str,
    summary: Mapping[str, Any],
    latency: Histogram,
    *,
    wall_s: float,
    cpu_s: float,
    peak_rss_mb: float,
    facts: InputFacts,
    limits: Limits,
) -> dict[str, Any]:
    """The report's figures for one run (the worker's or a baseline's)."""
    elapsed = _get(summary, "elapsed_s")
    requests = _get(summary, "requests")
    contacts = _get(summary, "contacts_applied")
    isolation = _get(summary, "isolation_requests")
    by_status = summary.get("requests_by_status", {})
    throttled = float(by_status.get("429", 0))
    records = _get(summary, "records_read")
    lat = latency.summary()
    problems = []
    if summary.get("ending") not in ("drained", None):
        problems.append(f"ended {summary.get('ending')}")
    if int(_get(summary, "acked")) != facts.lines:
        problems.append(f"acknowledged {int(_get(summary, 'acked'))} of {facts.lines} lines")
    mismatches = summary.get("state_mismatches")
    if mismatches:
        problems.append(f"{mismatches} contacts at the API differ from their last-written values")
    return {
        "who": who,
        "lines": facts.lines,
        "changes": facts.changes,
        "contacts": facts.contacts,
        "elapsed_s": elapsed,
        "wall_s": wall_s,
        "changes_per_s": ratio(records, elapsed),
        "contacts_applied": int(contacts),
        "contacts_per_s": ratio(facts.contacts, elapsed),
        "updates_per_s": ratio(contacts, elapsed),
        "requests": int(requests),
        "requests_429": int(throttled),
        "requests_per_s": ratio(requests, elapsed),
        "contacts_per_request": ratio(contacts, requests),
        "requests_per_contact": ratio(requests - throttled, facts.contacts),
        "isolation_requests": int(isolation),
        "isolation_per_unknown": ratio(isolation, facts.unknown),
        "retries": int(_get(summary, "retries")),
        "requests_by_status": dict(by_status),
        "dead_letters": dict(summary.get("dead_letters", {})),
        "coalesced": int(_get(summary, "coalesced")),
        "latency": lat,
        "cpu_s": cpu_s,
        "cpu_s_per_100k_changes": ratio(cpu_s * 100_000, records),
        "peak_rss_mb": peak_rss_mb,
        "time_ratio": ratio(elapsed, limits.limit_s),
        "own_rate_ratio": ratio(elapsed, ratio(requests - throttled, limits.rate)),
        "bound_ratio": ratio(ratio(requests - throttled, facts.contacts), limits.bound_per_contact),
        "state_mismatches": mismatches,
        "problems": problems,
    }


def model_inputs(variant: Variant, facts: InputFacts) -> PlanInputs:
    """The capacity model's inputs for a variant (its latency cut at the request timeout)."""
    w, api = variant.worker, variant.api
    lat = latency_facts(api.latency, w.request_timeout_s)
    errors = 1 - (1 - api.error_rate) * (1 - api.drop_rate) * (1 - lat.timeout_share)
    return PlanInputs(
        api_rate=api.rate_limit,
        worker_rate=w.rate,
        latency_ms=lat.mean_ms,
        batch_size=w.batch_size,
        concurrency=w.concurrency,
        backlog=facts.changes,
        contacts=facts.contacts,
        unknown_share=facts.unknown_share,
        changes_per_hour=variant.stream.arrival_rate * 3600,
        linger_ms=w.linger_ms,
        max_waiting=w.max_waiting,
        error_rate=min(errors, 0.99),
    )


def predict(variant: Variant, facts: InputFacts) -> dict[str, Any]:
    """The model's drain time and requests for a variant (a stream: over its arrival span)."""
    inputs = model_inputs(variant, facts)
    result: Plan = plan(inputs)
    arrival = variant.stream.arrival_rate
    if arrival:
        span = facts.lines / arrival
        drain = span + (inputs.linger_ms + inputs.latency_ms + inputs.overhead_ms) / 1000
        requests = result.requests_per_hour * span / 3600
    else:
        drain, requests = result.drain_s, result.requests
    return {
        "drain_s": drain,
        "requests": requests,
        "bottleneck": "arrival" if arrival else result.bottleneck,
        "plan": result.to_json(),
    }


def model_check(prediction: Mapping[str, Any], worker: Mapping[str, Any]) -> dict[str, Any]:
    """Predicted against measured: relative errors of drain time and requests (429s left out)."""
    measured_requests = worker["requests"] - worker["requests_429"]
    drain_error = ratio(prediction["drain_s"] - worker["elapsed_s"], worker["elapsed_s"])
    requests_error = ratio(prediction["requests"] - measured_requests, measured_requests)
    return {
        "predicted_drain_s": prediction["drain_s"],
        "measured_drain_s": worker["elapsed_s"],
        "drain_error": drain_error,
        "predicted_requests": prediction["requests"],
        "measured_requests": measured_requests,
        "requests_error": requests_error,
        "bottleneck": prediction["bottleneck"],
    }


def goal(
    name: str, variant: str, value: float | None, target: float, *, most: bool = True
) -> dict[str, Any]:
    """One goal check: ``value`` at most (or at least) ``target``."""
    met = (
        value is not None
        and not math.isnan(value)
        and (value <= target if most else value >= target)
    )
    return {
        "goal": name,
        "variant": variant,
        "value": value,
        "target": f"{'<=' if most else '>='} {target:.4g}",
        "met": met,
    }


def goals_for(
    variant: Variant, worker: Mapping[str, Any], check: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The goals a variant's settings ask for."""
    out = []
    time_goal = variant.run.time_goal
    if time_goal and worker.get("time_ratio") is not None:
        out.append(
            goal("time / time the rate allows", variant.label, worker["time_ratio"], time_goal)
        )
    requests_goal = variant.run.requests_goal
    if requests_goal and worker.get("contacts"):
        floor = math.ceil(worker["contacts"] / variant.worker.batch_size)
        out.append(
            goal(
                "requests / ceil(contacts / batch size)",
                variant.label,
                worker["requests"] / floor,
                requests_goal,
            )
        )
    model_goal = variant.run.model_goal
    if model_goal:
        for key, name in (
            ("drain_error", "model error, drain time"),
            ("requests_error", "model error, requests"),
        ):
            value = check.get(key)
            out.append(goal(name, variant.label, None if value is None else abs(value), model_goal))
    return out
