"""``kill -9`` of a real ``contact-worker run`` mid-run, twice, then a run to the end: at the
gateway, no contact's sequence number ever goes back (DESIGN 9), whatever the input."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.cli.test_cli import BIN, Gateway, worker_env
from tests.engine.harness import expected_state
from tests.engine.replay import regressions
from tests.engine.test_engine import stream

KILLS = 2


def changes() -> list[dict[str, Any]]:
    """6000 changes over 400 contacts, each with its per-contact sequence number in extra1."""
    return stream(6000, 400, seed=31)


def gateway() -> Gateway:
    """A gateway slow enough (30 ms a request) for the reader to run far ahead of the acks."""
    return Gateway("--known-count", "400", "--latency", "30", "--record-history")


def feed(uri: str, items: list[dict[str, Any]]) -> None:
    """`contact-worker enqueue --to URI`, as a producer would."""
    data = b"".join(json.dumps(c).encode() + b"\n" for c in items)
    done = subprocess.run(
        [BIN, "enqueue", "--to", uri], input=data, capture_output=True, timeout=60
    )
    assert 0 == done.returncode, done.stderr


def kill_twice_then_finish(
    gw: Gateway, tmp_path: Path, args: list[str], items: list[dict[str, Any]], *, finite: bool
) -> list[dict[str, Any]]:
    """Run, SIGKILL once some requests were applied, KILLS times; then run until every change
    is applied (a finite input exits by itself, a broker is stopped with SIGTERM). Returns the
    log events of the last run."""
    # 10 contacts a request, 20 requests a second: a run takes a few seconds, with every
    # change read (and coalesced) at once, so a killed run leaves most of them unacknowledged.
    env = worker_env(gw, tmp_path, WORKER_BATCH_SIZE="10", WORKER_RATE="20")
    for round_ in range(KILLS):
        before = gw.get("/_sim/stats")["requests"]
        with (tmp_path / f"run-{round_}.log").open("wb") as log:
            proc = subprocess.Popen([BIN, "run", *args], env=env, stderr=log)
        try:
            deadline = time.monotonic() + 30
            while gw.get("/_sim/stats")["requests"] < before + 10:
                assert proc.poll() is None, (tmp_path / f"run-{round_}.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no progress before the kill"
                time.sleep(0.01)
        finally:
            proc.kill()
            proc.wait(10)
    log_path = tmp_path / "run-last.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([BIN, "run", *args], env=env, stderr=log)
    try:
        want = expected_state(items)
        deadline = time.monotonic() + 90
        while gw.get("/_sim/contacts") != want:
            assert time.monotonic() < deadline, "not every change was applied"
            time.sleep(0.1)
        if not finite:
            proc.send_signal(signal.SIGTERM)
        assert 0 == proc.wait(30), log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert [] == regressions(gw.get("/_sim/history"))
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
