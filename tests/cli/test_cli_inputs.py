"""`init`, `enqueue` and `run` against a real PostgreSQL, as a user runs them."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.test_cli import BIN, Gateway, summary, worker_env
from tests.engine.harness import expected_state
from tests.engine.test_engine import stream
from tests.pg.conftest import BASE_DSN


@pytest.fixture
def schema() -> Iterator[str]:
    name = f"cli_{uuid.uuid4().hex[:12]}"
    yield name
    subprocess.run(
        ["psql", BASE_DSN, "-qc", f"DROP SCHEMA IF EXISTS {name} CASCADE"],
        capture_output=True,
        check=False,
        timeout=30,
    )


def test_postgres_outbox_end_to_end(tmp_path: Path, schema: str) -> None:
    """`init --to` creates the outbox, `enqueue --to` fills it from JSONL on stdin, `run`
    applies every change (invalid lines dead-lettered in the outbox's dead table) and exits 0
    on SIGTERM."""
    uri = f"{BASE_DSN}?schema={schema}"
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
        while time.monotonic() < deadline:
            if gw.get("/_sim/contacts") == expected_state(changes):
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert 0 == proc.returncode, stderr
        assert expected_state(changes) == gw.get("/_sim/contacts")
        done = summary(stderr)
        assert 501 == done["acked"]
        left = subprocess.run(
            [
                "psql",
                BASE_DSN,
                "-tAc",
                f"SELECT (SELECT count(*) FROM {schema}.contact_changes),"
                f" (SELECT count(*) FROM {schema}.contact_changes_dead)",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        assert "0|1" == left
    finally:
        gw.stop()
