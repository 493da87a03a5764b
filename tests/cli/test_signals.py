"""SIGTERM at random moments of a broker worker's life: every one is handled, logged, exit 0.

`contact-worker run` on a PostgreSQL outbox and on a partitioned Redis stream, against the
simulated gateway (its latency holds the start-up check and every request in flight for a
while): a signal as soon as the worker takes signals at all, while it connects, during the API
check, while the engine runs, while it drains (a second signal), and once the engine has ended
(while the input and sink close, and the process exits). The process is never killed by the
signal (-15): every signal is logged as `signal.received` and the exit code is 0.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import orjson
import pytest

from tests.cli.test_cli import BIN, Gateway, api_env, events
from tests.cli.test_cli_inputs import REDIS, free_port, psql, redis_cli
from tests.engine.test_engine import stream
from tests.pg.conftest import BASE_DSN
from worker.backends.postgres import producer as pg_enqueue
from worker.backends.redis import producer as redis_enqueue

SIGNALS = 50
"""Signals sent in all (each one to a live worker that has its handler in place)."""

SLOTS = 3
"""Workers alive at a time, each slot with its own gateway, outbox schema and stream."""

PLANS: tuple[tuple[str, ...], ...] = (
    ("start",),
    ("connecting",),
    ("check",),
    ("running",),
    ("running", "draining"),
    ("running", "ended"),
    ("running", "draining", "draining", "ended"),
)
"""When each worker gets its signals, cycled through (12 signals per round of 7 workers)."""


def sigterm_disposition(pid: int) -> str:
    """What the process does with SIGTERM now: ``caught`` (a handler), ``ignored`` (its exit
    code is decided and it is exiting), ``default`` (killed by it: before `run` took signals
    over, or a window the worker left open), ``gone`` (exited)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
    except FileNotFoundError:
        return "gone"
    if fields["State"].startswith(("Z", "X")):
        return "gone"
    bit = 1 << (signal.SIGTERM - 1)
    if int(fields["SigCgt"], 16) & bit:
        return "caught"
    return "ignored" if int(fields["SigIgn"], 16) & bit else "default"


@dataclass
class Slot:
    """One worker at a time: its gateway, its PostgreSQL outbox and its Redis stream."""

    number: int
    gateway: Gateway
    schema: str
    stream: str

    def uri(self, kind: str) -> str:
        if kind == "postgresql":
            return f"{BASE_DSN}?schema={self.schema}&poll_s=1"
        return f"{REDIS}?stream={self.stream}&partitions=3&consumer=slot{self.number}&poll_s=0.5"


@dataclass
class Life:
    """One worker process from start to exit, its stderr read as it comes."""

    proc: subprocess.Popen[bytes]
    lines: list[bytes] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    """The moments of the signals sent (none to a worker that exited or ignores them)."""
    _new_line: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr:
            for line in self.proc.stderr:
                with self._new_line:
                    self.lines.append(line)
                    self._new_line.notify_all()
        with self._new_line:
            self.lines.append(b"")  # the end
            self._new_line.notify_all()

    def wait_for(self, name: str) -> bool:
        """Wait for the log event ``name``; False if the worker ended without it."""
        with self._new_line:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if line == b"":
                        return False
                    if line.startswith(b"{") and orjson.loads(line)["event"] == name:
                        return True
                seen = len(self.lines)
                self._new_line.wait(60)

    def _wait_until_logged(self, name: str, count: int, timeout_s: float = 10.0) -> None:
        """Wait until the event ``name`` was logged ``count`` times, or the worker ended."""
        deadline = time.monotonic() + timeout_s
        with self._new_line:
            while time.monotonic() < deadline:
                logged = 0
                for line in self.lines:
                    if line == b"":
                        return
                    logged += line.startswith(b"{") and orjson.loads(line)["event"] == name
                if logged >= count:
                    return
                self._new_line.wait(0.05)

    def wait_until(self, condition: Callable[[], bool]) -> bool:
        """Poll ``condition`` while the worker lives; False if it ended first."""
        while self.proc.poll() is None:
            if condition():
                return True
            time.sleep(0.002)
        return False

    def signal(self, moment: str) -> None:
        """SIGTERM now, unless the worker has exited or ignores signals (it is exiting, its
        exit code decided). The last one sent is let through first (logged, or the worker
        gone): two SIGTERMs sent before the first was delivered become one (the kernel
        merges a pending signal into one of its kind), and the worker would log one."""
        self._wait_until_logged("signal.received", len(self.sent))
        if sigterm_disposition(self.proc.pid) in ("caught", "default"):
            self.proc.send_signal(signal.SIGTERM)
            self.sent.append(moment)

    def stderr(self) -> str:
        self.proc.wait(60)
        with self._new_line:
            while not self.lines or self.lines[-1] != b"":
                self._new_line.wait(60)
        return b"".join(self.lines).decode()


def live(slot: Slot, kind: str, plan: tuple[str, ...], rng: random.Random, tmp: Path) -> Life:
    """Start a worker on the slot's ``kind`` of input and signal it as ``plan`` says."""
    env = api_env(
        slot.gateway.url,
        tmp,
        WORKER_HTTP_PORT=str(free_port()),
        WORKER_RATE="5",
        WORKER_BATCH_SIZE="20",
        WORKER_CONCURRENCY="2",
        WORKER_PROGRESS_INTERVAL="0",
    )
    del env["WORKER_DLQ"]  # the input's own store: closing it is part of the end
    requests = slot.gateway.get("/_sim/stats")["requests"]
    life = Life(
        subprocess.Popen([BIN, "run", "--source", slot.uri(kind)], env=env, stderr=subprocess.PIPE)
    )
    # The worker's life starts when `run` takes signals over (Python's own start-up and the
    # imports come before: a signal then still kills the process).
    life.wait_until(lambda: sigterm_disposition(life.proc.pid) != "default")
    for moment in plan:
        if moment == "connecting":
            time.sleep(rng.uniform(0, 0.25))
        elif moment == "check":
            # The check's request is held by the gateway's latency for a while.
            life.wait_until(lambda: slot.gateway.get("/_sim/stats")["requests"] > requests)
            time.sleep(rng.uniform(0, 0.25))
        elif moment == "running":
            life.wait_for("starting")
            time.sleep(rng.uniform(0, 0.5))
        elif moment == "draining":
            time.sleep(rng.uniform(0, 0.2))
        elif moment == "ended":
            life.wait_for("summary")
            time.sleep(rng.uniform(0, 0.005))
        life.signal(moment)
    return life


@pytest.fixture
def slots() -> Iterator[list[Slot]]:
    """Three slots, each input filled with more changes than the workers get through."""
    made: list[Slot] = []
    try:
        for number in range(SLOTS):
            tag = uuid.uuid4().hex[:12]
            slot = Slot(
                number, Gateway("--known-count", "500", "--latency", "300"), f"sig_{tag}", tag
            )
            made.append(slot)
            lines = [orjson.dumps(change) for change in stream(3000, 500, seed=number)]
            for kind, module in (("postgresql", pg_enqueue), ("redis", redis_enqueue)):
                uri = slot.uri(kind)
                anyio.run(module.init, uri)
                anyio.run(module.enqueue, uri, lines)
        yield made
    finally:
        for slot in made:
            slot.gateway.stop()
            psql(f"DROP SCHEMA IF EXISTS {slot.schema} CASCADE")
            keys = redis_cli("--scan", "--pattern", f"{slot.stream}*").split()
            if keys:
                redis_cli("DEL", *keys)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_at_random_moments_always_drains_and_exits_0(
    slots: list[Slot], tmp_path: Path
) -> None:
    """50 SIGTERMs at random moments of PostgreSQL and Redis workers' lives (from the moment
    `run` takes signals to its exit): each worker exits 0, never killed by a signal, and logs
    each signal it got as `signal.received` with the phase it came in."""
    seed = int(os.environ.get("SIGNALS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    results: list[tuple[str, tuple[str, ...], Life]] = []
    lock = threading.Lock()
    counter = iter(range(1 << 30))

    def serve(slot: Slot) -> None:
        own = random.Random(rng.random())
        while True:
            with lock:
                if sum(len(life.sent) for _, _, life in results) >= SIGNALS:
                    return
                n = next(counter)
                kind, plan = ("postgresql", "redis")[n % 2], PLANS[n % len(PLANS)]
            life = live(slot, kind, plan, own, tmp_path)
            life.stderr()
            with lock:
                results.append((kind, plan, life))

    with ThreadPoolExecutor(SLOTS) as pool:
        for done in [pool.submit(serve, slot) for slot in slots]:
            done.result()

    sent = sum(len(life.sent) for _, _, life in results)
    assert sent >= SIGNALS
    phases: set[str] = set()
    for kind, plan, life in results:
        stderr = life.stderr()
        where = f"seed {seed}, {kind} worker, plan {plan}, sent {life.sent}:\n{stderr}"
        assert 0 == life.proc.returncode, where
        assert "Traceback" not in stderr, where
        received = [e for e in events(stderr) if e["event"] == "signal.received"]
        assert len(life.sent) == len(received), where
        phases.update(e["phase"] for e in received)
    # The moments did land in every phase (a signal routed while starting, running, draining,
    # and after the engine ended).
    assert {"starting", "running", "draining", "ending"} <= phases, phases
