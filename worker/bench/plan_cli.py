"""``contact-worker plan``: the capacity model on the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any

from worker.bench.bounds import (
    INFERRED,
    binary_entropy,
    requests_per_contact,
)
from worker.bench.model import (
    CPU_US_PER_CHANGE,
    CPU_US_PER_REQUEST,
    OVERHEAD_MS,
    Plan,
    PlanInputs,
    fresh_per_contact,
    plan,
)
from worker.core.grouptest import fresh_riders, group_size
from worker.core.scheduler import DEFAULT_MAX_WAITING


def _number(kind: Any, low: float, *, strict: bool = False) -> Any:
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}")
        return value

    return convert


def _share(text: str) -> float:
    value: float = _number(float, 0.0)(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError("must be below 1")
    return value


def configure_parser(p: argparse.ArgumentParser) -> None:
    """The model's inputs as flags."""
    add = p.add_argument
    add(
        "--api-rate",
        type=_number(float, 0),
        required=True,
        metavar="R",
        help="requests/s the API allows (0 = no limit)",
    )
    add("--latency-ms", type=_number(float, 0), default=20.0, help="mean API latency (20)")
    add("--batch-size", type=_number(int, 1), default=100, help="contacts per request (100)")
    add("--concurrency", type=_number(int, 1), default=8, help="requests in flight (8)")
    add("--backlog", type=_number(int, 0), default=0, metavar="N", help="changes waiting (0)")
    add(
        "--contacts",
        type=_number(int, 0),
        default=None,
        metavar="N",
        help="distinct IDs among them (default: as many as changes)",
    )
    add(
        "--unknown-share",
        type=_share,
        default=0.0,
        metavar="P",
        help="share of the IDs the API does not know, 0..1 (0)",
    )
    add(
        "--changes-per-hour",
        type=_number(float, 0),
        default=0.0,
        metavar="V",
        help="steady inflow of changes, for requests/hour and replicas (0)",
    )
    add(
        "--worker-rate",
        type=_number(float, 0),
        default=0.0,
        metavar="R",
        help="the worker's --rate if below the API's (0 = the API's)",
    )
    add("--linger-ms", type=_number(float, 0), default=200.0, help="the worker's (200)")
    add(
        "--max-waiting",
        type=_number(int, 1),
        default=DEFAULT_MAX_WAITING,
        help=f"the worker's ({DEFAULT_MAX_WAITING})",
    )
    add(
        "--error-rate",
        type=_share,
        default=0.0,
        metavar="P",
        help="share of requests failing transiently and retried (0)",
    )
    add(
        "--target-drain-s",
        type=_number(float, 0, strict=True),
        default=None,
        metavar="S",
        help="drain the backlog within S seconds: how many replicas",
    )
    add(
        "--cpu-us-per-change",
        type=_number(float, 0),
        default=CPU_US_PER_CHANGE,
        help=f"worker CPU per change, microseconds ({CPU_US_PER_CHANGE:g})",
    )
    add(
        "--cpu-us-per-request",
        type=_number(float, 0),
        default=CPU_US_PER_REQUEST,
        help=f"worker CPU per request, microseconds ({CPU_US_PER_REQUEST:g})",
    )
    add(
        "--overhead-ms",
        type=_number(float, 0),
        default=OVERHEAD_MS,
        help=f"time per request beyond the API latency ({OVERHEAD_MS:g})",
    )
    add("--json", action="store_true", help="print the prediction as JSON")


def inputs_from_args(args: argparse.Namespace) -> PlanInputs:
    """The model's inputs from parsed flags; ValueError names what does not fit."""
    return PlanInputs(
        api_rate=args.api_rate,
        latency_ms=args.latency_ms,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        backlog=args.backlog,
        contacts=args.contacts,
        unknown_share=args.unknown_share,
        changes_per_hour=args.changes_per_hour,
        worker_rate=args.worker_rate,
        linger_ms=args.linger_ms,
        max_waiting=args.max_waiting,
        error_rate=args.error_rate,
        target_drain_s=args.target_drain_s,
        cpu_us_per_change=args.cpu_us_per_change,
        cpu_us_per_request=args.cpu_us_per_request,
        overhead_ms=args.overhead_ms,
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render(result: Plan) -> str:
    """The prediction for people."""
    i = result.inputs
    rate = f"{result.rate:g} requests/s" if result.rate else "no rate limit"
    rows = [("rate that binds", rate)]
    if i.backlog:
        contacts = i.contacts if i.contacts is not None else i.backlog
        rows += [
            (
                "contact updates",
                f"{result.sends:,.0f} after coalescing {i.backlog:,} changes over {contacts:,} IDs",
            ),
            (
                "requests",
                f"{result.requests:,.0f} ({result.requests_new:,.0f} new, "
                f"{result.requests_isolation:,.0f} isolating unknown IDs, "
                f"{result.requests_retry:,.0f} retries); information bound "
                f"{result.bound_requests:,.0f}",
            ),
            (
                "drain time",
                f"{_duration(result.drain_s)} (bound by {result.bottleneck}: rate "
                f"{result.rate_s:.1f} s, latency {result.latency_s:.1f} s, "
                f"CPU {result.cpu_s:.1f} s)",
            ),
            (
                "throughput",
                f"{result.changes_per_s:,.0f} changes/s, {result.contacts_per_s:,.0f} "
                f"contacts/s, {result.requests_per_s:,.1f} requests/s",
            ),
        ]
    share = (
        f" ({100 * result.utilisation:.0f}% of the rate limit)"
        if result.utilisation is not None
        else ""
    )
    replicas = "-" if result.replicas is None else str(result.replicas)
    rows += [
        ("capacity", f"{result.capacity_changes_per_hour:,.0f} changes/hour per worker"),
        ("requests/hour", f"{result.requests_per_hour:,.0f}{share}"),
        ("replicas", f"{replicas}: {result.replicas_note}"),
    ]
    if i.backlog > i.max_waiting:
        held = plan(dataclasses.replace(i, max_waiting=i.backlog))
        rows.append(
            (
                "max waiting",
                f"the backlog is larger than --max-waiting {i.max_waiting:,}: changes to one ID "
                f"merge only within that window; --max-waiting {i.backlog} would need "
                f"{held.requests:,.0f} requests, {_duration(held.drain_s)}",
            )
        )
    if i.unknown_share > 0:
        p, size = i.unknown_share, i.batch_size
        bound = max(1 / size, binary_entropy(p))
        splitting = fresh_per_contact(size, p)
        halving = requests_per_contact(size, p, INFERRED)
        rows.append(
            (
                "unknown IDs",
                f"fresh IDs go in groups of {group_size(p, size)} (generalized binary splitting"
                + (
                    ", the requests of a search also carrying other IDs: riders,"
                    " docs/id-knowledge.md"
                    if fresh_riders(p, size)
                    else ""
                )
                + f"): {splitting:.4f} requests per contact, {splitting / bound:.2f}x the"
                f" information bound (halving whole batches: {halving / bound:.2f}x); an ID seen"
                " again is known (full batches if it exists, no request if it is missing)",
            )
        )
        if size < 100 and group_size(p, 1000) > size:
            rows.append(
                (
                    "batch size",
                    f"a larger batch size lets fresh IDs go in groups of {group_size(p, 1000)}:"
                    " fewer requests per contact",
                )
            )
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def main(args: argparse.Namespace) -> int:
    """Print the prediction; 2 on inputs that do not fit together."""
    try:
        result = plan(inputs_from_args(args))
    except ValueError as exc:
        print(f"contact-worker plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(render(result))
    return 0
