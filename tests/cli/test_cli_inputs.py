"""`init`, `enqueue` and `run` against real PostgreSQL and Redis, as a user runs them."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


@pytest.fixture(params=["postgresql", "redis", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
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
    elif request.param == "sqlite":
        spool = tmp_path / "spool.db"

        def counts_sqlite() -> tuple[int, int]:
            db = sqlite3.connect(spool)
            try:
                pending = db.execute("SELECT count(*) FROM changes").fetchone()[0]
                dead = db.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
            finally:
                db.close()
            return int(pending), int(dead)

        yield f"sqlite:{spool}", counts_sqlite
    else:

        def counts_redis() -> tuple[int, int]:
            return int(redis_cli("XLEN", name)), int(redis_cli("XLEN", f"{name}:dead"))

        yield f"{REDIS}?stream={name}&consumer=cli-test&claim_idle_s=1", counts_redis
        redis_cli("DEL", name, f"{name}:dead", f"{name}:ids:exists", f"{name}:ids:missing")


@pytest.mark.slow
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
        # What the API taught lasts in the input's own store (docs/id-knowledge.md).
        shown = subprocess.run(
            [BIN, "state", "show", uri, "--json"], capture_output=True, text=True, timeout=60
        )
        assert 0 == shown.returncode, shown.stderr
        known = json.loads(shown.stdout)
        assert (len({str(c["ID"]) for c in changes}), 0) == (known["exists"], known["missing"])
    finally:
        gw.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: bytes, token: str) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_sqlite_spool_ingest_end_to_end(tmp_path: Path) -> None:
    """The embedded default: upstream POSTs changes to the worker's port with a bearer token,
    gets 202 once they are durable, and the worker applies them; a wrong token gets 401."""
    gw = Gateway("--known-count", "100", "--latency", "1")
    port = free_port()
    try:
        env = worker_env(gw, tmp_path, WORKER_HTTP_PORT=str(port), WORKER_INGEST_TOKEN="tok-123")
        del env["WORKER_DLQ"]
        proc = subprocess.Popen(
            [BIN, "run", "--source", f"sqlite:{tmp_path / 'spool.db'}"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        url = f"http://127.0.0.1:{port}/v1/changes"
        changes = stream(300, 100, seed=21)
        body = json.dumps([*changes, {"ID": 5, "nickname": "x"}]).encode()
        deadline = time.monotonic() + 20
        while True:
            try:
                status, answer = post(url, body, "wrong")
                break
            except OSError:
                assert time.monotonic() < deadline, "the worker's port never opened"
                time.sleep(0.1)
        assert 401 == status
        status, answer = post(url, body, "tok-123")
        assert 202 == status, answer
        assert 300 == answer["accepted"]
        assert [300] == [r["index"] for r in answer["rejected"]]
        while time.monotonic() < deadline and gw.get("/_sim/contacts") != expected_state(changes):
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert 0 == proc.returncode, stderr
        assert expected_state(changes) == gw.get("/_sim/contacts")
        assert "tok-123" not in stderr
    finally:
        gw.stop()


@pytest.mark.slow
def test_input_error_while_running_is_reported(tmp_path: Path) -> None:
    """An input that breaks while the engine runs (the stream replaced by a string) stops the
    run with exit 1 and the source's own message, not the task groups' wrapping."""
    name = f"cli_{uuid.uuid4().hex[:12]}"
    uri = f"{REDIS}?stream={name}&consumer=cli-test&poll_s=0.1"
    gw = Gateway("--known-count", "100")
    try:
        subprocess.run([BIN, "init", "--to", uri], check=True, capture_output=True, timeout=60)
        proc = subprocess.Popen(
            [BIN, "run", "--source", uri],
            env=worker_env(gw, tmp_path),
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while not redis_cli("XINFO", "CONSUMERS", name, "contact-worker"):
            assert time.monotonic() < deadline, "the worker never read"
            time.sleep(0.1)
        redis_cli("DEL", name)
        redis_cli("SET", name, "not a stream")
        _, stderr = proc.communicate(timeout=30)
        print(stderr)
        assert 1 == proc.returncode, stderr
        assert f"key '{name}' exists and is not a stream" in stderr
        assert "TaskGroup" not in stderr
    finally:
        gw.stop()
        redis_cli("DEL", name)
