"""``contact-worker bench SCENARIO --out DIR``: run a scenario, write its report.

SCENARIO is the name of a packaged scenario (``steady``) or the path of a TOML file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from worker.bench.charts import draw
from worker.bench.display import Display, PlainDisplay, RichDisplay
from worker.bench.harness import Harness
from worker.bench.processes import BenchError, Quiet
from worker.bench.report import write
from worker.bench.scenario import ScenarioError, load_scenario, packaged_scenarios


def configure_parser(p: argparse.ArgumentParser) -> None:
    """The bench command's options."""
    p.add_argument(
        "scenario",
        metavar="SCENARIO",
        help="a packaged scenario by name (" + ", ".join(packaged_scenarios()) + ") or the path"
        " of a scenario TOML file",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="where report.json, report.md, the charts and the runs' logs go",
    )
    p.add_argument(
        "--cache",
        metavar="DIR",
        help="where generated inputs are kept "
        "(default DIR/inputs; share one between runs to generate them once)",
    )
    p.add_argument(
        "--only",
        action="append",
        metavar="LABEL",
        help="run only the variant with this label (repeatable)",
    )
    p.add_argument("--no-baselines", action="store_true", help="skip the baselines")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="S",
        help="before each run, wait up to S s for other processes to go quiet (0)",
    )
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no progress bar")


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def summary(data: dict[str, Any], out: Path) -> str:
    """The end-of-run summary: each run's headline figures, the goals, where the report is."""
    lines = [f"contact-worker bench {data['scenario']}: {data['duration_s']:.0f} s"]
    for v in data["variants"]:
        lines.append(f"  {v['label']}")
        for who, row in [("contact-worker", v["worker"]), *v["baselines"].items()]:
            lat = row["latency"]
            lines.append(
                f"    {who:<15} {row['elapsed_s']:8.2f} s (x{_fmt(row['time_ratio'], '.3f')} limit)"
                f" {_fmt(row['contacts_per_s'], ',.0f'):>9} contacts/s"
                f" {row['requests']:>7,} requests"
                f" ({_fmt(row['requests_per_contact'], '.3f')}/contact,"
                f" x{_fmt(row['bound_ratio'], '.2f')} bound)"
                f" p50/p95/p99 {_fmt(lat['p50_s'] and 1000 * lat['p50_s'], '.0f')}/"
                f"{_fmt(lat['p95_s'] and 1000 * lat['p95_s'], '.0f')}/"
                f"{_fmt(lat['p99_s'] and 1000 * lat['p99_s'], '.0f')} ms"
                f" RSS {row['peak_rss_mb']:.0f} MB"
            )
    for g in data["goals"]:
        state = "met" if g["met"] else "NOT MET"
        lines.append(
            f"  goal {g['goal']} [{g['variant']}]: {_fmt(g['value'], '.3f')} {g['target']}: {state}"
        )
    lines.append(f"  report: {out / 'report.md'}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run the scenario; 0 when every run completed, 1 on a failed run, 2 on a bad scenario."""
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        print(f"contact-worker bench: {exc}", file=sys.stderr)
        return 2
    variants = scenario.variants
    if args.only:
        missing = sorted(set(args.only) - {v.label for v in variants})
        if missing:
            labels = ", ".join(v.label for v in variants)
            print(
                f"contact-worker bench: no variant {missing[0]!r}; variants: {labels}",
                file=sys.stderr,
            )
            return 2
        variants = tuple(v for v in variants if v.label in args.only)
    if args.no_baselines:
        variants = tuple(
            dataclasses.replace(v, baselines=dataclasses.replace(v.baselines, max_changes=0))
            for v in variants
        )
    scenario = dataclasses.replace(scenario, variants=variants)
    out = Path(args.out)
    console = Console(stderr=True)
    live = console.is_terminal and not args.no_progress
    display: Display = RichDisplay(console) if live else PlainDisplay()
    harness = Harness(
        out, display, Quiet(args.quiet_wait), Path(args.cache) if args.cache else None
    )
    try:
        if isinstance(display, RichDisplay):
            with display.progress:
                data = harness.run(scenario)
        else:
            data = harness.run(scenario)
    except BenchError as exc:
        print(f"contact-worker bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("contact-worker bench: interrupted", file=sys.stderr)
        return 130
    charts, note = draw(out, data)
    write(out, data, charts, note)
    print(summary(data, out))
    return 0
