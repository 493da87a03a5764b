"""Running a scenario: per variant, a fresh simulator process and the worker in its own
process, then each baseline against a fresh simulator of its own; measured, then summed up.

Everything a run leaves (input, logs, dead letters, probe output) goes under the output
directory; generated inputs are cached by their spec, so a rerun skips generating them.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from worker.bench import figures
from worker.bench.histogram import Histogram
from worker.bench.probe import PROBE_OUT_ENV
from worker.bench.processes import (
    CLIENT_ID,
    CLIENT_SECRET,
    BenchError,
    ProcessRun,
    Quiet,
    SimulatorProcess,
    clean_env,
    machine,
    run_process,
    tail,
)
from worker.bench.scenario import Scenario, Variant
from worker.sim.stream import StreamSpec, write_file


class Display(Protocol):
    """Where progress goes (a rich progress bar, or nothing)."""

    def start(self, label: str, total: int) -> None:
        """A run of ``total`` lines begins."""

    def update(self, done: int) -> None:
        """``done`` lines of the current run are acknowledged."""

    def finish(self, message: str) -> None:
        """The current run ended; one line about it."""

    def note(self, message: str) -> None:
        """Something worth a line of its own."""


class PlainDisplay:
    """Progress as occasional plain lines on stderr (no terminal tricks)."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._label, self._total, self._last = "", 0, 0.0

    def start(self, label: str, total: int) -> None:
        """See :class:`Display`."""
        self._label, self._total, self._last = label, total, time.monotonic()
        self.note(f"{label}: {total:,} lines")

    def update(self, done: int) -> None:
        """See :class:`Display`."""
        if time.monotonic() - self._last >= self.interval_s:
            self._last = time.monotonic()
            self.note(f"{self._label}: {done:,}/{self._total:,}")

    def finish(self, message: str) -> None:
        """See :class:`Display`."""
        self.note(f"{self._label}: {message}")

    def note(self, message: str) -> None:
        """See :class:`Display`."""
        print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclass
class Harness:
    """Runs the variants of a scenario into ``out``."""

    out: Path
    display: Display = field(default_factory=PlainDisplay)
    quiet: Quiet = field(default_factory=Quiet)
    cache: Path | None = None
    python: str = sys.executable

    def __post_init__(self) -> None:
        # The children run in their run's directory: every path handed to them is absolute.
        self.out = self.out.resolve()
        if self.cache is not None:
            self.cache = self.cache.resolve()

    @property
    def data(self) -> Path:
        """Where generated inputs are kept."""
        return self.cache or self.out / "inputs"

    # -- inputs ----------------------------------------------------------------------------

    def stream_file(self, variant: Variant) -> tuple[Path, figures.InputFacts]:
        """The variant's input (generated once per spec) and its facts."""
        s = variant.stream
        spec = StreamSpec(
            changes=s.changes,
            contacts=s.contacts,
            unknown_share=s.unknown_share,
            invalid=s.invalid,
            distribution=s.distribution,
            zipf_s=s.zipf_s,
            seed=s.seed,
        )
        name = (
            f"stream-{spec.changes}c-{spec.contacts}ids-{spec.distribution}{spec.zipf_s:g}"
            f"-u{spec.unknown_share:g}-i{spec.invalid}-s{spec.seed}.jsonl"
        )
        path = self.data / name
        if not path.exists():
            self.data.mkdir(parents=True, exist_ok=True)
            self.display.note(f"generating {spec.lines:,} lines: {path.name}")
            tmp = path.with_name(path.name + ".tmp")
            write_file(spec, tmp)
            tmp.replace(path)
        return path, self._facts(path, s.contacts)

    def prefix_file(self, path: Path, lines: int, known: int) -> tuple[Path, figures.InputFacts]:
        """The first ``lines`` lines of an input, for the baselines."""
        prefix = path.with_name(f"{path.stem}-first{lines}.jsonl")
        if not prefix.exists():
            with open(path, "rb") as src, open(prefix, "wb") as dst:
                for number, line in enumerate(src):
                    if number >= lines:
                        break
                    dst.write(line)
        return prefix, self._facts(prefix, known)

    def _facts(self, path: Path, known: int) -> figures.InputFacts:
        sidecar = path.with_name(path.name + f".facts-{known}.json")
        if sidecar.exists() and sidecar.stat().st_mtime >= path.stat().st_mtime:
            data = json.loads(sidecar.read_text())
            data.pop("unknown_share", None)
            return figures.InputFacts(**data)
        with open(path, "rb") as f:
            facts = figures.facts_of(f, known)
        sidecar.write_text(json.dumps(facts.to_json()))
        return facts

    # -- processes -------------------------------------------------------------------------

    @staticmethod
    def sim_options(variant: Variant) -> list[str]:
        """``contact-worker simulate`` flags for a variant's API."""
        api = variant.api
        options = ["--known-count", str(variant.stream.contacts), "--latency", api.latency]
        options += ["--seed", str(variant.stream.seed)]
        if api.rate_limit:
            options += ["--rate-limit", f"{api.rate_limit:g}"]
        if api.error_rate:
            options += ["--error-rate", f"{api.error_rate:g}"]
        if api.drop_rate:
            options += ["--drop-rate", f"{api.drop_rate:g}"]
        if api.max_array:
            options += ["--max-array", str(api.max_array)]
        return options

    def _env(self, url: str, **extra: str) -> dict[str, str]:
        return clean_env() | {
            "SMSGW_CLIENT_ID": CLIENT_ID,
            "SMSGW_CLIENT_SECRET": CLIENT_SECRET,
            "SMSGW_API_URL": url,
            **extra,
        }

    def _run(
        self,
        label: str,
        command: list[str],
        *,
        env: dict[str, str],
        log: Path,
        total: int,
        timeout_s: float,
        feed: tuple[Path, float] | None,
    ) -> tuple[ProcessRun, dict[str, Any]]:
        events: dict[str, Any] = {"done": 0}

        def on_line(event: dict[str, Any]) -> None:
            if event.get("event") == "progress":
                events["done"] = int(event.get("acked", 0))
            elif event.get("event") == "summary":
                events["summary"] = event

        self.display.start(label, total)
        run = run_process(
            command,
            log_path=log,
            timeout_s=timeout_s,
            env=env,
            cwd=log.parent,
            on_line=on_line,
            feed=feed,
            tick=lambda: self.display.update(events["done"]),
        )
        self.display.update(total if run.returncode == 0 else events["done"])
        return run, events

    def run_worker(
        self, variant: Variant, source: Path, total: int, timeout_s: float, run_dir: Path
    ) -> dict[str, Any]:
        """The worker (with its probe) against a fresh simulator: measured."""
        w = variant.worker
        stream = variant.stream.arrival_rate > 0
        with SimulatorProcess(self.sim_options(variant), run_dir / "worker-sim.log") as sim:
            self.quiet.wait(self.display.note)
            probe_out = run_dir / "worker-probe.json"
            command = [self.python, "-m", "worker.bench.probe", "run"]
            command += ["--source", "jsonl:-" if stream else f"jsonl:{source}"]
            command += ["--dlq", f"jsonl:{run_dir / 'worker-dead-letters.jsonl'}"]
            command += ["--http-port", "0", "--log-format", "json", "--log-level", "info"]
            command += ["--batch-size", str(w.batch_size), "--linger-ms", f"{w.linger_ms:g}"]
            command += ["--rate", f"{w.rate:g}", "--concurrency", str(w.concurrency)]
            command += ["--request-timeout", f"{w.request_timeout_s:g}"]
            command += [
                "--max-waiting",
                str(w.max_waiting),
                "--suspect-ttl",
                f"{w.suspect_ttl_s:g}",
            ]
            log = run_dir / "worker.log"
            run, _ = self._run(
                f"{variant.label}: contact-worker",
                command,
                env=self._env(sim.url, **{PROBE_OUT_ENV: str(probe_out)}),
                log=log,
                total=total,
                timeout_s=timeout_s,
                feed=(source, variant.stream.arrival_rate) if stream else None,
            )
            sim_stats, sim_cpu = sim.stats(), sim.cpu_s()
        summary, counts = read_log(log)
        if run.returncode != 0 or not summary:
            raise BenchError(f"worker exited {run.returncode}; log {log}:\n{tail(log)}")
        latency = Histogram()
        if probe_out.exists():
            latency = Histogram.from_json(json.loads(probe_out.read_text())["latency"])
        return {
            "run": run,
            "summary": summary,
            "events": counts,
            "latency": latency,
            "sim": sim_stats,
            "sim_cpu_s": sim_cpu,
        }

    def run_baseline(
        self, kind: str, variant: Variant, source: Path, total: int, timeout_s: float, run_dir: Path
    ) -> dict[str, Any]:
        """One baseline against a fresh simulator: measured."""
        w = variant.worker
        stream = variant.stream.arrival_rate > 0
        with SimulatorProcess(self.sim_options(variant), run_dir / f"{kind}-sim.log") as sim:
            self.quiet.wait(self.display.note)
            command = [self.python, "-m", "worker.bench.baselines", kind]
            command += ["--source", "-" if stream else str(source), "--api-url", sim.url]
            command += ["--batch-size", str(w.batch_size), "--linger-ms", f"{w.linger_ms:g}"]
            command += ["--rate", f"{w.rate:g}", "--concurrency", str(w.concurrency)]
            command += ["--request-timeout", f"{w.request_timeout_s:g}"]
            log = run_dir / f"{kind}.log"
            run, events = self._run(
                f"{variant.label}: baseline {kind}",
                command,
                env=self._env(sim.url),
                log=log,
                total=total,
                timeout_s=timeout_s,
                feed=(source, variant.stream.arrival_rate) if stream else None,
            )
            sim_stats = sim.stats()
        summary = events.get("summary")
        if run.returncode != 0 or summary is None:
            raise BenchError(f"baseline {kind} exited {run.returncode}; log {log}:\n{tail(log)}")
        latency = Histogram.from_json(summary.pop("latency"))
        return {"run": run, "summary": summary, "latency": latency, "sim": sim_stats}

    # -- a variant, a scenario ---------------------------------------------------------------

    def run_variant(self, variant: Variant, run_dir: Path) -> dict[str, Any]:
        """Run the worker and the baselines of one variant; its part of the report."""
        run_dir.mkdir(parents=True, exist_ok=True)
        source, facts = self.stream_file(variant)
        limits = figures.limits_of(facts, variant)
        prediction = figures.predict(variant, facts)
        timeout = variant.run.timeout_s or 120 + 4 * prediction["drain_s"]
        measured = self.run_worker(variant, source, facts.lines, timeout, run_dir)
        worker = figures.run_figures(
            "contact-worker",
            measured["summary"],
            measured["latency"],
            wall_s=measured["run"].wall_s,
            cpu_s=measured["run"].cpu_s,
            peak_rss_mb=measured["run"].peak_rss_mb,
            facts=facts,
            limits=limits,
        )
        worker["simulator"] = _sim_figures(measured["sim"], measured["sim_cpu_s"])
        self.display.finish(_finished(worker))
        check = figures.model_check(prediction, worker)
        result: dict[str, Any] = {
            "label": variant.label,
            "settings": variant.settings(),
            "input": facts.to_json(),
            "limits": limits.to_json(),
            "worker": worker,
            "latency_histograms": {"contact-worker": measured["latency"].to_json()},
            "baselines": {},
            "model": {**check, "plan": prediction["plan"]},
            "goals": figures.goals_for(variant, worker, check),
        }
        if variant.baselines.max_changes and variant.baselines.kinds:
            prefix, prefix_facts = self.prefix_file(
                source, variant.baselines.max_changes, variant.stream.contacts
            )
            prefix_limits = figures.limits_of(prefix_facts, variant)
            result["baseline_input"] = prefix_facts.to_json()
            result["baseline_limits"] = prefix_limits.to_json()
            rate = limits.rate or math.inf
            budget = 120 + 4 * max(prefix_facts.lines / rate, prefix_limits.limit_s or 0)
            for kind in variant.baselines.kinds:
                got = self.run_baseline(
                    kind,
                    variant,
                    prefix,
                    prefix_facts.lines,
                    variant.run.timeout_s or budget,
                    run_dir,
                )
                row = figures.run_figures(
                    kind,
                    got["summary"],
                    got["latency"],
                    wall_s=got["run"].wall_s,
                    cpu_s=got["run"].cpu_s,
                    peak_rss_mb=got["run"].peak_rss_mb,
                    facts=prefix_facts,
                    limits=prefix_limits,
                )
                row["simulator"] = _sim_figures(got["sim"], None)
                result["baselines"][kind] = row
                result["latency_histograms"][kind] = got["latency"].to_json()
                self.display.finish(_finished(row))
        return result

    def run(self, scenario: Scenario) -> dict[str, Any]:
        """Run every variant of a scenario; the report's data."""
        self.out.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        variants = []
        for number, variant in enumerate(scenario.variants, start=1):
            self.display.note(f"variant {number}/{len(scenario.variants)}: {variant.label}")
            variants.append(self.run_variant(variant, self.out / "runs" / _slug(variant.label)))
        return {
            "scenario": scenario.name,
            "description": scenario.description,
            "file": scenario.path,
            "sweep": scenario.sweep,
            "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "duration_s": round(time.monotonic() - started, 1),
            "variants": variants,
            "goals": [g for v in variants for g in v["goals"]],
        }


def _slug(label: str) -> str:
    keep = [c if c.isalnum() or c in "-_." else "-" for c in label]
    return "".join(keep).strip("-") or "variant"


def _finished(row: dict[str, Any]) -> str:
    lat = row["latency"]
    p50 = "-" if lat["p50_s"] is None else f"{1000 * lat['p50_s']:.0f} ms"
    return (
        f"{row['elapsed_s']:.2f} s, {row['requests']:,} requests, "
        f"{row['contacts_per_s'] or 0:,.0f} contacts/s, p50 {p50}"
        + (f"; PROBLEMS: {'; '.join(row['problems'])}" if row["problems"] else "")
    )


def _sim_figures(stats: dict[str, Any], cpu_s: float | None) -> dict[str, Any]:
    keys = (
        "requests",
        "by_status",
        "dropped",
        "contacts_applied",
        "max_ids_per_request",
        "duplicate_ids_in_a_request",
        "overlapping_id_requests",
        "max_in_flight",
    )
    return {k: stats.get(k) for k in keys} | {"cpu_s": cpu_s}


def read_log(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The summary event and a count of every event name in a worker's JSON-lines log."""
    summary: dict[str, Any] = {}
    events: Counter[str] = Counter()
    for obj in _json_lines(path):
        name = obj.get("event")
        if isinstance(name, str):
            events[name] += 1
            if name == "summary":
                summary = obj
    return summary, dict(events)


def _json_lines(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as f:
        for line in f:
            if line.startswith(b"{"):
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    yield obj
