"""Running a scenario: per variant, a fresh simulator process and the worker in its own
process, then each baseline against a fresh simulator of its own; measured, then summed up.

Everything a run leaves (input, logs, dead letters, probe output) goes under the output
directory; generated inputs are cached by their spec, so a rerun skips generating them.

The developer scripts in benchmarks/ run the worker the same way, through the functions at the
top (cached inputs, the ``run`` arguments, the worker's summary) and
:func:`worker.bench.processes.measure`.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from worker.bench import figures
from worker.bench.display import Display, PlainDisplay
from worker.bench.histogram import Histogram
from worker.bench.processes import (
    BenchError,
    Measured,
    ProcessRun,
    Quiet,
    SimulatorProcess,
    machine,
    measure,
    run_process,
    tail,
    worker_env,
)
from worker.bench.replay import replay
from worker.bench.scenario import Scenario, Variant, WorkerConfig
from worker.sim.stream import StreamSpec, expected_final_state, write_file

PROBE_OUT_ENV = "CONTACT_WORKER_PROBE_OUT"
"""Where ``python -m worker.bench.probe`` writes its latency histogram."""

Ran = tuple[Measured, dict[str, Any], Histogram]
"""A measured run, the summary it printed or logged, its change-to-ack latencies."""


# -- what the runs share with the developer scripts in benchmarks/ -------------------------------


def cached(path: Path, write: Callable[[Path], None], note: Callable[[str], None]) -> Path:
    """``path``, written by ``write`` (to a temporary name, then renamed) unless it exists."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        tmp = path.with_name(path.name + ".tmp")
        write(tmp)
        tmp.replace(path)
        note(f"generated {path.name} in {time.perf_counter() - started:.1f} s")
    return path


def stream_file(spec: StreamSpec, directory: Path, note: Callable[[str], None]) -> Path:
    """The JSONL file of the stream ``spec`` describes, generated once into ``directory``."""
    name = (
        f"stream-{spec.changes}c-{spec.contacts}ids-{spec.distribution}{spec.zipf_s:g}"
        f"-u{spec.unknown_share:g}-i{spec.invalid}-s{spec.seed}.jsonl"
    )
    return cached(directory / name, lambda tmp: write_file(spec, tmp), note)


def worker_flags(w: WorkerConfig, *, engine: bool = True) -> list[str]:
    """The settings as flags: of ``contact-worker run``, or (not ``engine``) of a baseline."""
    flags = ["--batch-size", str(w.batch_size), "--linger-ms", f"{w.linger_ms:g}"]
    flags += ["--rate", f"{w.rate:g}", "--concurrency", str(w.concurrency)]
    flags += ["--request-timeout", f"{w.request_timeout_s:g}"]
    if engine:
        flags += ["--max-waiting", str(w.max_waiting), "--suspect-ttl", f"{w.suspect_ttl_s:g}"]
    return flags


def run_args(source: str, dead_letters: Path, w: WorkerConfig) -> list[str]:
    """``run`` and its arguments for a measured run: JSON logs on stderr, no status port."""
    args = ["run", "--source", source, "--dlq", f"jsonl:{dead_letters}"]
    args += ["--http-port", "0", "--log-format", "json", "--log-level", "info"]
    return args + worker_flags(w)


def worker_summary(process: ProcessRun, log: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The summary and the event counts of a worker that ran to its end; BenchError if not."""
    summary, events = read_log(log)
    if process.returncode != 0 or not summary:
        raise BenchError(f"worker exited {process.returncode}; log {log}:\n{tail(log)}")
    return summary, events


@dataclass
class Harness:
    """Runs the variants of a scenario into ``out``."""

    out: Path
    display: Display = field(default_factory=PlainDisplay)
    quiet: Quiet = field(default_factory=Quiet)
    cache: Path | None = None
    python: str = sys.executable
    _baselines_done: dict[tuple[Any, ...], tuple[str, Ran]] = field(
        default_factory=dict, repr=False
    )

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
        path = stream_file(spec, self.data, self.display.note)
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
    ) -> Ran:
        """The worker (with its probe) against a fresh simulator: measured, its summary and its
        change-to-ack latencies."""
        stream = variant.stream.arrival_rate > 0
        probe_out = run_dir / "worker-probe.json"
        command = [self.python, "-m", "worker.bench.probe"]
        command += run_args(
            "jsonl:-" if stream else f"jsonl:{source}",
            run_dir / "worker-dead-letters.jsonl",
            variant.worker,
        )
        warm = variant.worker.warm_runs
        if warm:
            state = run_dir / "state.db"
            state.unlink(missing_ok=True)
            command += ["--state", f"sqlite:{state}"]
        for k in range(warm):  # the same input before: the measured run is a restart
            warm_log = run_dir / f"worker-warm-{k + 1}.log"
            label = f"{variant.label}: contact-worker, warm-up run {k + 1}"
            ran = self._measure(label, variant, command, source, warm_log, total, timeout_s)
            worker_summary(ran[0].process, warm_log)
        log = run_dir / "worker.log"
        measured = self._measure(
            f"{variant.label}: contact-worker",
            variant,
            command,
            source,
            log,
            total,
            timeout_s,
            {PROBE_OUT_ENV: str(probe_out)},
        )[0]
        summary, _ = worker_summary(measured.process, log)
        latency = Histogram()
        if probe_out.exists():
            latency = Histogram.from_json(json.loads(probe_out.read_text())["latency"])
        return measured, summary, latency

    def run_baseline(
        self, kind: str, variant: Variant, source: Path, total: int, timeout_s: float, run_dir: Path
    ) -> Ran:
        """One baseline against a fresh simulator: measured, its summary and its latencies."""
        stream = variant.stream.arrival_rate > 0
        command = [self.python, "-m", "worker.bench.baselines", kind]
        command += ["--source", "-" if stream else str(source)]
        command += worker_flags(variant.worker, engine=False)
        log = run_dir / f"{kind}.log"
        label = f"{variant.label}: baseline {kind}"
        measured, events = self._measure(label, variant, command, source, log, total, timeout_s)
        summary = events.get("summary")
        if measured.process.returncode != 0 or summary is None:
            raise BenchError(
                f"baseline {kind} exited {measured.process.returncode}; log {log}:\n{tail(log)}"
            )
        return measured, summary, Histogram.from_json(summary.pop("latency"))

    def _measure(
        self,
        label: str,
        variant: Variant,
        command: list[str],
        source: Path,
        log: Path,
        total: int,
        timeout_s: float,
        env: dict[str, str] | None = None,
    ) -> tuple[Measured, dict[str, Any]]:
        """``command`` against a fresh simulator, fed the variant's stream if it has one; the
        progress on the display. Its cost, and what it printed (its summary, if any)."""
        events: dict[str, Any] = {"done": 0}
        rate = variant.stream.arrival_rate

        def on_line(event: dict[str, Any]) -> None:
            if event.get("event") == "progress":
                events["done"] = int(event.get("acked", 0))
            elif event.get("event") == "summary":
                events["summary"] = event

        def run(sim: SimulatorProcess) -> ProcessRun:
            self.display.start(label, total)
            done = run_process(
                command,
                log_path=log,
                timeout_s=timeout_s,
                env=worker_env(sim.url, **(env or {})),
                cwd=log.parent,
                on_line=on_line,
                feed=(source, rate) if rate > 0 else None,
                tick=lambda: self.display.update(events["done"]),
            )
            self.display.update(total if done.returncode == 0 else events["done"])
            return done

        measured = measure(
            self.sim_options(variant),
            log.with_name(f"{log.stem}-sim.log"),
            run,
            quiet=self.quiet,
            note=self.display.note,
            check=lambda sim: self.check_state(sim, source, variant.stream.contacts),
        )
        return measured, events

    def check_state(self, sim: SimulatorProcess, source: Path, known: int) -> int:
        """Contacts whose state at the API differs from their last-written values.

        Waits first for the simulator to finish the requests it still holds (a request whose
        client timed out is still applied, like on a real server).
        """
        deadline = time.monotonic() + 30
        while sim.stats().get("in_flight", 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        state = sim.call("/_sim/contacts")
        with open(source, "rb") as f:
            expected = expected_final_state(f)
        is_known = figures.known_below(known)
        return sum(
            1 for key, fields in expected.items() if is_known(key) and state.get(key) != fields
        )

    # -- a variant, a scenario ---------------------------------------------------------------

    def run_variant(self, variant: Variant, run_dir: Path) -> dict[str, Any]:
        """Run the worker and the baselines of one variant; its part of the report."""
        run_dir.mkdir(parents=True, exist_ok=True)
        source, facts = self.stream_file(variant)
        limits = figures.limits_of(facts, variant)
        prediction = figures.predict(variant, facts)
        timeout = variant.run.timeout_s or 120 + 4 * prediction["drain_s"]
        ran = self.run_worker(variant, source, facts.lines, timeout, run_dir)
        worker = _figures("contact-worker", ran, facts, limits)
        measured = ran[0]
        worker["simulator"] = _sim_figures(measured.sim_stats, measured.sim_cpu_s)
        worker["others_cpu_pct"] = measured.others_cpu_pct
        if measured.others_cpu_pct > 25:
            worker["problems"].append(
                f"other processes used {measured.others_cpu_pct:.0f}% of a core meanwhile:"
                " the figures are not the worker's alone"
            )
        self.display.finish(_finished(worker))
        check = figures.model_check(prediction, worker)
        result: dict[str, Any] = {
            "label": variant.label,
            "settings": variant.settings(),
            "input": facts.to_json(),
            "limits": limits.to_json(),
            "worker": worker,
            "latency_histograms": {"contact-worker": ran[2].to_json()},
            "baselines": {},
            "model": {**check, "plan": prediction["plan"]},
            "goals": figures.goals_for(variant, worker, check),
        }
        if facts.unknown:
            with open(source, "rb") as f:
                replayed = replay(
                    f,
                    figures.known_below(variant.stream.contacts),
                    batch_size=variant.worker.batch_size,
                    max_waiting=variant.worker.max_waiting,
                )
            result["replay"] = replayed.to_json()
        for kind in variant.baselines.kinds:
            lines = variant.baselines.lines_for(kind)
            if lines:
                self._baseline(kind, lines, variant, source, limits, run_dir, result)
        return result

    def _baseline(
        self,
        kind: str,
        lines: int,
        variant: Variant,
        source: Path,
        limits: figures.Limits,
        run_dir: Path,
        result: dict[str, Any],
    ) -> None:
        """Run one baseline on the first ``lines`` lines; add its figures to ``result``.

        A baseline whose settings did not change since an earlier variant (per-change does not
        batch, so a batch-size sweep leaves it alone) is not run again: its figures are reused.
        """
        prefix, facts = self.prefix_file(source, lines, variant.stream.contacts)
        w = variant.worker
        key = (
            kind,
            prefix,
            variant.api,
            variant.stream.arrival_rate,
            w.rate,
            w.concurrency,
            w.request_timeout_s,
            (w.batch_size, w.linger_ms) if kind != "per-change" else None,
        )
        prefix_limits = figures.limits_of(facts, variant)
        reused = self._baselines_done.get(key)
        if reused is None:
            rate = limits.rate or math.inf
            budget = 120 + 4 * max(facts.lines / rate, prefix_limits.limit_s or 0)
            timeout = variant.run.timeout_s or budget
            got = self.run_baseline(kind, variant, prefix, facts.lines, timeout, run_dir)
            self._baselines_done[key] = (variant.label, got)
        else:
            got = reused[1]
            self.display.note(f"{variant.label}: baseline {kind}: as run for {reused[0]}")
        # Figures afresh: the limits (batch size) may differ from the variant it was run for.
        row = _figures(kind, got, facts, prefix_limits)
        if reused is not None:
            row["same_run_as"] = reused[0]
        row["simulator"] = _sim_figures(got[0].sim_stats, None)
        row["input"] = facts.to_json()
        row["limits"] = prefix_limits.to_json()
        result["baselines"][kind] = row
        result["latency_histograms"][kind] = got[2].to_json()
        if reused is None:
            self.display.finish(_finished(row))

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


def _figures(
    name: str, ran: Ran, facts: figures.InputFacts, limits: figures.Limits
) -> dict[str, Any]:
    """The report's figures of one run."""
    measured, summary, latency = ran
    return figures.run_figures(
        name,
        summary | {"state_mismatches": measured.mismatches},
        latency,
        wall_s=measured.process.wall_s,
        cpu_s=measured.process.cpu_s,
        peak_rss_mb=measured.process.peak_rss_mb,
        facts=facts,
        limits=limits,
    )


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
