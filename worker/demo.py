"""``contact-worker demo``: the real engine against the simulated gateway, no setup needed."""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import anyio

from worker.backends.jsonl.sink import JsonlDeadLetters
from worker.backends.jsonl.source import JsonlSource
from worker.config import Secret, Settings, non_negative_float, positive_int, senders
from worker.engine import Engine, Result
from worker.obs import logging as obs_logging
from worker.run import EXIT_CODES, backend_options, engine_settings, tune_runtime
from worker.sender import Sender
from worker.sim.gateway import SimConfig, Simulator, serve
from worker.sim.stream import StreamSpec, expected_final_state, generate_lines


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _arg(parse: Any) -> Any:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def configure_parser(p: argparse.ArgumentParser) -> None:
    """The demo's knobs; the defaults make a run of a few seconds."""
    p.add_argument("--changes", type=_arg(positive_int), default=50_000, help="changes to stream")
    p.add_argument("--contacts", type=_arg(positive_int), default=10_000, help="distinct contacts")
    p.add_argument(
        "--unknown-share",
        type=_share,
        default=0.01,
        help="share of changes to IDs the API does not know",
    )
    p.add_argument("--invalid", type=_arg(int), default=5, help="invalid lines mixed in")
    p.add_argument(
        "--distribution",
        choices=("uniform", "zipf"),
        default="zipf",
        help="how changes spread over contacts",
    )
    p.add_argument("--batch-size", type=_arg(positive_int), default=100)
    p.add_argument("--linger-ms", type=_arg(non_negative_float), default=50.0)
    p.add_argument(
        "--rate",
        type=_arg(non_negative_float),
        default=500.0,
        help="requests/s of the worker (0 = no limit)",
    )
    p.add_argument("--concurrency", type=_arg(positive_int), default=8)
    p.add_argument(
        "--latency", default="exp:20", help="simulated API latency in ms (e.g. 20, exp:5)"
    )
    p.add_argument("--seed", type=_arg(int), default=1)
    p.add_argument(
        "--dir",
        default=None,
        help="where to write the input and dead letters (default: a new temporary directory, kept)",
    )


class ProgressLine:
    """A one-line live progress display on a terminal, a line every few seconds elsewhere."""

    def __init__(self, engine: Engine, total: int, stream: TextIO) -> None:
        self.engine, self.total, self.stream = engine, total, stream
        self.tty = stream.isatty()

    def render(self) -> str:
        e, s = self.engine.stats, self.engine.scheduler.stats
        done = e.acked
        pct = 100.0 * done / self.total if self.total else 100.0
        elapsed = max(e.elapsed_s, 1e-9)
        requests = sum(s.requests.values())
        return (
            f"{pct:5.1f}% acked {done:,}/{self.total:,} | read {e.records:,} | "
            f"applied {s.contacts_applied:,} contacts in {requests:,} requests | "
            f"dead {sum(s.dead_letters.values()) + e.invalid:,} | "
            f"{e.records / elapsed:,.0f} changes/s"
        )

    async def run(self) -> None:
        interval = 0.2 if self.tty else 2.0
        while True:
            await anyio.sleep(interval)
            self.show()

    def show(self, final: bool = False) -> None:
        line = self.render()
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"  {label:<{width}}  {value}" for label, value in rows)


def _log2_choose(n: int, k: int) -> float:
    """log2 of n choose k: the bits needed to tell which k of n contacts are unknown."""
    if k <= 0 or k >= n:
        return 0.0
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def _knowledge_text(engine: Engine) -> str:
    """What the scheduler knew of the IDs it composed batches from."""
    knowledge = engine.scheduler.knowledge.stats
    exists, missing = knowledge.hits["exists"], knowledge.hits["missing"]
    share = engine.scheduler.unknown_share.share
    return (
        f"{exists:,} IDs sent known to exist (full batches), {missing:,} known missing"
        f" (dead-lettered without a request), {knowledge.misses:,} fresh (in groups of"
        f" {engine.scheduler.group} for the {share:.2%} found unknown)"
    )


def summary_table(engine: Engine, result: Result, verified: str) -> str:
    """The end-of-run table: what was read, sent, applied, dead-lettered, and what it cost."""
    data = engine.summary()
    s = engine.scheduler.stats
    requests = data["requests"]
    by_status = ", ".join(f"{k}: {v:,}" for k, v in data["requests_by_status"].items())
    dead = data["dead_letters"]
    dead_text = ", ".join(f"{k}: {v:,}" for k, v in sorted(dead.items())) or "none"
    isolation = data["isolation_requests"]
    elapsed = data["elapsed_s"]
    per_request = s.contacts_applied / max(1, requests)
    # The information bound holds for fresh IDs; IDs known from earlier answers need only
    # their full batches (known to exist) or nothing (known missing).
    knowledge = engine.scheduler.knowledge.stats
    size = engine.settings.scheduler.limits.max_items
    found = s.dead_entries["not_found"] - s.known_missing
    fresh = knowledge.misses
    bound = max(fresh / size, _log2_choose(fresh, found)) + knowledge.hits["exists"] / size
    cost = (
        f"{isolation:,} requests ({100 * isolation / max(1, requests):.1f}% of all) to find "
        f"{found:,} unknown IDs among {fresh:,} fresh contacts sent; the information bound for "
        f"them and full batches for the IDs known to exist make {math.ceil(bound):,} requests "
        f"(ours: {requests / max(1.0, bound):.2f}x that)"
    )
    rows = [
        ("ending", result.ending.value),
        ("changes read", f"{data['records_read']:,} ({data['invalid']:,} invalid)"),
        ("coalesced away", f"{data['coalesced']:,} (merged into a waiting change of the same ID)"),
        ("requests", f"{requests:,} ({by_status})"),
        ("contacts applied", f"{data['contacts_applied']:,} ({per_request:.1f} per request)"),
        ("dead-lettered", f"{sum(dead.values()):,} changes ({dead_text})"),
        ("retries", f"{data['retries']:,}"),
        ("isolation cost", cost),
        ("ID knowledge", _knowledge_text(engine)),
        (
            "throughput",
            f"{data['records_read'] / elapsed:,.0f} changes/s, "
            f"{requests / elapsed:,.0f} requests/s over {elapsed:.2f} s"
            if elapsed > 0
            else "n/a",
        ),
        ("rate-limit wait", f"{data['rate_wait_s']:.2f} s summed over senders"),
        ("check", verified),
    ]
    return _table(rows)


async def _demo(args: argparse.Namespace, workdir: Path) -> int:
    spec = StreamSpec(
        changes=args.changes,
        contacts=args.contacts,
        unknown_share=args.unknown_share,
        invalid=args.invalid,
        distribution=args.distribution,
        seed=args.seed,
    )
    input_path = workdir / "changes.jsonl"
    dlq_path = workdir / "dead-letters.jsonl"
    started = time.monotonic()
    lines = list(generate_lines(spec))
    input_path.write_bytes(b"".join(lines))
    print(
        f"generated {len(lines):,} changes over {spec.contacts:,} contacts "
        f"({spec.unknown_share:.1%} to unknown IDs, {spec.invalid} invalid) in "
        f"{time.monotonic() - started:.1f} s: {input_path}",
        file=sys.stderr,
    )
    sim = Simulator(SimConfig(known_count=spec.contacts, latency=args.latency, seed=args.seed))
    secret = Secret("demo-secret")
    async with serve(sim) as url:
        settings = Settings(
            source=f"jsonl:{input_path}",
            client_id="demo",
            client_secret=secret,
            dlq=f"jsonl:{dlq_path}",
            api_url=url,
            batch_size=args.batch_size,
            linger_ms=args.linger_ms,
            rate=args.rate,
            concurrency=args.concurrency,
            http_port=0,
        )
        print(
            f"simulated gateway at {url}; worker: batch {settings.batch_size}, rate "
            f"{settings.rate or math.inf:g}/s, concurrency {settings.concurrency}",
            file=sys.stderr,
        )
        source = JsonlSource(str(input_path))
        sink = JsonlDeadLetters(str(dlq_path))
        await source.open()
        await sink.open()
        try:
            async with Sender(url, "demo", secret, concurrency=senders(settings)) as sender:
                engine = Engine(source, sink, sender, engine_settings(settings))
                progress = ProgressLine(engine, len(lines), sys.stderr)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(progress.run)
                    result = await engine.run()
                    tg.cancel_scope.cancel()
                progress.show(final=True)
        finally:
            await sink.close()
            await source.close()
    expected = {k: v for k, v in expected_final_state(lines).items() if sim.is_known(k)}
    wrong = [k for k, fields in expected.items() if sim.contacts.get(k) != fields]
    verified = (
        f"API state matches the last-written values of all {len(expected):,} known contacts"
        if not wrong
        else f"MISMATCH for {len(wrong):,} contacts, e.g. {wrong[:3]}"
    )
    print("\ncontact-worker demo summary\n" + summary_table(engine, result, verified))
    print(f"\n  input: {input_path}\n  dead letters: {dlq_path}")
    code = EXIT_CODES[result.ending]
    return 1 if wrong and code == 0 else code


def main(args: argparse.Namespace) -> int:
    """Run the demo; exit 0 when everything drained and the API state checks out."""
    tune_runtime()

    obs_logging.configure("console" if sys.stderr.isatty() else "json", "warning")
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="contact-worker-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    code: int = anyio.run(_demo, args, workdir, backend_options=backend_options())
    return code
