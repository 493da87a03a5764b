"""`init`, `enqueue` and `run` against real PostgreSQL and Redis, as a user runs them."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cli.test_cli import BIN, Gateway, summary, worker_env
from tests.engine.harness import expected_state
from tests.engine.test_engine import stream
from tests.pg.conftest import BASE_DSN

REDIS = "redis://127.0.0.1:6379/0"


def psql(sql: str) -> str:
    return subprocess.run(
        ["psql", BASE_DSN, "-tAc", sql], capture_output=True, text=True, timeout=30, check=True
    ).stdout.strip()


def redis_cli(*args: str) -> str:
    return subprocess.run(
        ["redis-cli", "-u", REDIS, *args], capture_output=True, text=True, timeout=30, check=True
    ).stdout.strip()


Store = tuple[str, Callable[[], tuple[int, int]]]


@pytest.fixture(params=["postgresql", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """An input URI in a fresh namespace, and how to count (pending, dead) in it."""
    name = f"cli_{uuid.uuid4().hex[:12]}"
    if request.param == "postgresql":

        def counts_pg() -> tuple[int, int]:
            pending, dead = psql(
                f"SELECT (SELECT count(*) FROM {name}.contact_changes),"
                f" (SELECT count(*) FROM {name}.contact_changes_dead)"
            ).split("|")
            return int(pending), int(dead)

        yield f"{BASE_DSN}?schema={name}", counts_pg
        psql(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    else:

        def counts_redis() -> tuple[int, int]:
            return int(redis_cli("XLEN", name)), int(redis_cli("XLEN", f"{name}:dead"))

        yield f"{REDIS}?stream={name}&consumer=cli-test&claim_idle_ms=1000", counts_redis
        redis_cli("DEL", name, f"{name}:dead")


def test_input_end_to_end(tmp_path: Path, store: Store) -> None:
    """`init --to` prepares the input, `enqueue --to` fills it from JSONL on stdin, `run`
    applies every change (the invalid line dead-lettered in the input's own store) and exits
    0 on SIGTERM, leaving nothing pending."""
    uri, counts = store
    gw = Gateway("--known-count", "100", "--latency", "1")
    try:
        init = subprocess.run(
            [BIN, "init", "--to", uri], capture_output=True, text=True, timeout=60
        )
        assert 0 == init.returncode, init.stderr
        changes = stream(500, 100, seed=12)
        data = b"".join(json.dumps(c).encode() + b"\n" for c in changes) + b"{oops\n"
        enq = subprocess.run(
            [BIN, "enqueue", "--to", uri], input=data, capture_output=True, timeout=60
        )
        assert 0 == enq.returncode, enq.stderr
        assert b"enqueued 501 changes" in enq.stderr
        env = worker_env(gw, tmp_path)
        del env["WORKER_DLQ"]  # dead letters default to the input's own store
        proc = subprocess.Popen(
            [BIN, "run", "--source", uri], env=env, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and counts() != (0, 1):
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert 0 == proc.returncode, stderr
        assert expected_state(changes) == gw.get("/_sim/contacts")
        assert 501 == summary(stderr)["acked"]
        assert (0, 1) == counts()
    finally:
        gw.stop()
