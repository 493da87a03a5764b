"""The report of a benchmark: report.json for machines, report.md (with the charts) for people.

Its table writer is the one every benchmark uses, the developer scripts in benchmarks/ too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NOTES = (
    "time: the run's own clock (the worker's engine, from its summary), start-up left out; "
    "wall time with start-up is in report.json.",
    "× limit: time over the least time, the time the rate allows (requests needed / R, with "
    "requests needed = the information bound max(n/B, n·H(p)) for the n distinct IDs) or, for "
    "a stream, the time the input takes to arrive. The rate's token buckets start full, so a "
    "short run can beat it by up to one second's worth of requests.",
    "contacts/s: distinct IDs settled (applied or dead-lettered) per second; updates/request: "
    "contact updates applied per request (an ID sent twice counts twice).",
    "requests/contact: requests (429s left out) per distinct ID; × bound: that over the "
    "information bound per contact, max(1/B, H(p)).",
    "× own requests/R: time over the time the rate allows for the requests the run did send "
    "(429s left out): how fully it used the rate, whatever it sent.",
    "latency: change-to-ack, from the moment the change was read to the moment it was applied "
    "or dead-lettered (the worker's probe; the baselines' own clock).",
    "baselines replay only the first lines of the input (they are slow by design); their "
    "limits and bounds are computed for those lines.",
    "problems under a table: lines not settled, contacts the simulated API does not hold as "
    "last written (checked after each run), or other processes busy on the cores meanwhile.",
)


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Table:
    """A titled table (what the developer scripts in benchmarks/ print and save)."""

    title: str
    headers: list[str]
    rows: list[list[Any]]

    def markdown(self) -> str:
        """The table under a ``###`` heading."""
        return f"### {self.title}\n\n{table(self.headers, self.rows)}"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


RUN_HEADERS = [
    "run",
    "lines",
    "time s",
    "× limit",
    "× own requests/R",
    "changes/s",
    "contacts/s",
    "requests",
    "requests/s",
    "updates/request",
    "requests/contact",
    "× bound",
    "isolation requests",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "CPU s/100k changes",
    "peak RSS MB",
]


def run_row(row: Mapping[str, Any], name: str) -> list[Any]:
    """One run's figures as a table row."""
    lat = row["latency"]
    return [
        name,
        row["lines"],
        row["elapsed_s"],
        row["time_ratio"],
        row["own_rate_ratio"],
        row["changes_per_s"],
        row["contacts_per_s"],
        row["requests"],
        row["requests_per_s"],
        row["contacts_per_request"],
        row["requests_per_contact"],
        row["bound_ratio"],
        row["isolation_requests"],
        _ms(lat["p50_s"]),
        _ms(lat["p95_s"]),
        _ms(lat["p99_s"]),
        row["cpu_s_per_100k_changes"],
        row["peak_rss_mb"],
    ]


def limit_row(limits: Mapping[str, Any], lines: int, name: str) -> list[Any]:
    """The limits as a table row under the runs they bound."""
    limit_s = limits["limit_s"]
    return [
        name,
        lines,
        limit_s,
        1.0 if limit_s else None,
        None,
        None,
        (limits["contacts"] / limit_s) if limit_s else None,
        limits["requests_needed"],
        limits["rate"] or None,
        None,
        limits["bound_per_contact"],
        1.0,
        None,
        None,
        None,
        None,
        None,
        None,
    ]


def _side_by_side(variant: Mapping[str, Any]) -> str:
    rows = [run_row(variant["worker"], "contact-worker")]
    rows.append(limit_row(variant["limits"], variant["input"]["lines"], "limit (all lines)"))
    baselines = variant["baselines"]
    shown: set[int] = set()
    for kind, row in baselines.items():
        first = row["input"]["lines"]
        part = "all lines" if first == variant["input"]["lines"] else f"first {first:,} lines"
        rows.append(run_row(row, f"{kind} ({part})"))
    for row in baselines.values():
        first = row["input"]["lines"]
        if first not in shown and first != variant["input"]["lines"]:
            shown.add(first)
            rows.append(limit_row(row["limits"], first, f"limit (first {first:,} lines)"))
    problems = [
        f"- {who}: {'; '.join(r['problems'])}"
        for who, r in [("contact-worker", variant["worker"]), *baselines.items()]
        if r["problems"]
    ]
    return table(RUN_HEADERS, rows) + ("\n\n" + "\n".join(problems) if problems else "")


def _isolation(variants: Sequence[Mapping[str, Any]]) -> str | None:
    rows = []
    for v in variants:
        limits = v["limits"]
        if limits["unknown_share"] <= 0:
            continue
        bound = limits["bound_per_contact"]

        def versus(value: float | None, bound: float = bound) -> str:
            return "-" if value is None else f"{value:.4f} ({value / bound:.2f}×)"

        row: list[Any] = [
            v["label"],
            f"{limits['unknown_share']:.2%}",
            limits["contacts"],
            limits["batch_size"],
            f"{bound:.4f}",
            versus(limits["plain_halving_per_contact"]),
            versus(limits["worker_halving_per_contact"]),
            versus(limits.get("splitting_per_contact")),
            versus(v["replay"]["plain_per_contact"]) if "replay" in v else "-",
            versus(v["replay"]["per_contact"]) if "replay" in v else "-",
            versus(v["worker"]["requests_per_contact"]),
        ]
        for kind in ("per-change", "batch-fallback"):
            base = v["baselines"].get(kind)
            if base is None:
                row.append("-")
            else:
                base_bound = base["limits"]["bound_per_contact"]
                row.append(versus(base["requests_per_contact"], base_bound))
        rows.append(row)
    if not rows:
        return None
    headers = [
        "variant",
        "unknown p",
        "contacts n",
        "batch B",
        "bound max(1/B, H(p))",
        "plain halving (expected)",
        "halving, known-bad half not sent (expected)",
        "generalized binary splitting (expected)",
        "plain halving (replayed)",
        "worker's core (replayed)",
        "contact-worker (measured)",
        "per-change",
        "batch-fallback",
    ]
    return table(headers, rows)


def _model(variants: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        [
            v["label"],
            v["model"]["bottleneck"],
            v["model"]["predicted_drain_s"],
            v["model"]["measured_drain_s"],
            _pct(v["model"]["drain_error"]),
            v["model"]["predicted_requests"],
            v["model"]["measured_requests"],
            _pct(v["model"]["requests_error"]),
        ]
        for v in variants
    ]
    headers = [
        "variant",
        "bound by",
        "predicted s",
        "measured s",
        "error",
        "predicted requests",
        "measured requests (no 429s)",
        "error",
    ]
    return table(headers, rows)


def markdown(data: Mapping[str, Any], charts: Sequence[tuple[str, str]], chart_note: str) -> str:
    """report.md."""
    m = data["machine"]
    parts = [f"# Benchmark: {data['scenario']}", ""]
    if data["description"]:
        parts += [data["description"].strip(), ""]
    parts += [
        f"Measured {data['at']} on {m['cpus']} cores {m['cpu_model'] or ''}, Python "
        f"{m['python']}, {m['event_loop']}; the run took {data['duration_s']:.0f} s. "
        f"Scenario file: `{data['file']}`.",
        "",
    ]
    if data["goals"]:
        parts += ["## Goals", ""]
        goal_rows = [
            [g["goal"], g["variant"], _cell(g["value"], 3), g["target"], g["met"]]
            for g in data["goals"]
        ]
        parts += [table(["goal", "variant", "value", "target", "met"], goal_rows), ""]
    parts += ["## Side by side: contact-worker, the baselines, the limits", ""]
    for v in data["variants"]:
        if len(data["variants"]) > 1:
            parts += [f"### {v['label']}", ""]
        parts += [_side_by_side(v), ""]
    isolation = _isolation(data["variants"])
    if isolation:
        parts += ["## Finding unknown IDs: requests per contact against the information bound", ""]
        parts += [isolation, ""]
        parts += [
            "Expected figures are exact for independent unknown IDs, each sent once: plain "
            "halving sends both halves of a refused batch of B; the halving the worker did "
            "before does not send the second half when the first was applied (it must hold "
            "the culprit); generalized binary splitting, what it does now, sends fresh IDs in "
            "groups sized for the unknown share and returns the second half of a refused half "
            "to the fresh IDs. Replayed: this input through the worker's pure core "
            "(worker.core.scheduler) against a pure model of the API, all of it read before "
            "sending (no timing; IDs seen again are known), and its distinct IDs halved "
            "plainly in full batches. Measured: every request of the real run.",
            "",
        ]
    parts += ["## The capacity model (`contact-worker plan`) against the measured runs", ""]
    parts += [_model(data["variants"]), ""]
    parts += ["## Charts", ""]
    if charts:
        parts += [f"![{title}]({name})\n" for name, title in charts]
    if chart_note:
        parts += [chart_note, ""]
    parts += ["## How to read this", ""]
    parts += [f"- {note}" for note in NOTES]
    return "\n".join(parts).rstrip() + "\n"


def write(out: Path, data: Mapping[str, Any], charts: Sequence[tuple[str, str]], note: str) -> None:
    """Write report.json and report.md into ``out``."""
    payload = dict(data) | {"charts": [name for name, _ in charts], "chart_note": note or None}
    (out / "report.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(data, charts, note))
