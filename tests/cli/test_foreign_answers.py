"""A wrong API path never destroys an input (issue 10 item 1), as a user meets it.

`contact-worker run` against the simulator as a process: a path one level off is refused at
start-up (exit 2); a proxy that starts answering 404 pages after the start-up check stops the
run (exit 1) with nothing dead-lettered and nothing acknowledged, on a file and on Redis.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.cli.test_cli import BIN, Gateway, events, run, worker_env
from tests.cli.test_cli_inputs import REDIS, redis_cli
from tests.engine.harness import expected_state, write_lines
from tests.engine.test_engine import stream


def dead_letters(tmp_path: Path) -> list[str]:
    """The lines of the run's jsonl: dead-letter file (the sink creates it empty at start)."""
    path = tmp_path / "dead.jsonl"
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def source(tmp_path: Path) -> list[str]:
    """A jsonl: source of 2,000 changes with a checkpoint file: the args of `run`."""
    write_lines(tmp_path / "in.jsonl", stream(2000, 300))
    return ["--source", f"jsonl:{tmp_path / 'in.jsonl'}", "--checkpoint", str(tmp_path / "cp")]


class TestWrongPath:
    def test_a_path_one_level_off_exits_2_before_reading(
        self, tmp_path: Path, source: list[str]
    ) -> None:
        """`--api-url` with a path the server does not serve: its 404 page to ``PATCH []``
        exits 2 naming --api-url; nothing read, nothing dead-lettered, no checkpoint."""
        gw = Gateway("--known-count", "300")
        try:
            env = worker_env(gw, tmp_path, SMSGW_API_URL=gw.url + "/api")
            result = run(source, env)
            assert 2 == result.returncode, result.stderr
            message = result.stderr.strip().splitlines()[-1]
            assert message.startswith("contact-worker: HTTP 404 to PATCH [] at ")
            assert "--api-url" in message and "/api/v1/contact" in message
            assert 0 == gw.get("/_sim/stats")["requests"]  # /api/v1/contact is not the API
            assert not (tmp_path / "cp").exists()
            assert not dead_letters(tmp_path)
        finally:
            gw.stop()

    def test_a_proxy_page_for_every_request_exits_2(
        self, tmp_path: Path, source: list[str]
    ) -> None:
        """A proxy answering every request with an HTML 404: the start-up check's one
        request is all the API sees."""
        gw = Gateway("--known-count", "300", "--foreign-404-share", "1")
        try:
            result = run(source, worker_env(gw, tmp_path))
            assert 2 == result.returncode, result.stderr
            assert "404: Not Found" in result.stderr
            assert 1 == gw.get("/_sim/stats")["requests"]
            assert not dead_letters(tmp_path)
        finally:
            gw.stop()


class TestProxyAfterTheStart:
    def test_file_input_exits_1_with_nothing_dead_or_acked(
        self, tmp_path: Path, source: list[str]
    ) -> None:
        """404 pages from the first request after the start-up check: exit 1 within a few
        requests (at most one per sender), no dead letter, the checkpoint never written."""
        gw = Gateway("--known-count", "300", "--foreign-404-share", "1", "--foreign-after", "1")
        try:
            result = run(source, worker_env(gw, tmp_path, WORKER_CONCURRENCY="8"))
            assert 1 == result.returncode, result.stderr
            message = result.stderr.strip().splitlines()[-1]
            assert message.startswith("contact-worker: stopped sending: HTTP 404: ")
            assert "nothing was dead-lettered or acknowledged" in message
            assert gw.get("/_sim/stats")["requests"] <= 1 + 8
            assert not dead_letters(tmp_path)
            # The checkpoint says how far was read (DESIGN 9); nothing of it acknowledged.
            checkpoint = json.loads((tmp_path / "cp").read_text())
            assert (0, 0) == (checkpoint["line"], checkpoint["offset"])
            names = [e["event"] for e in events(result.stderr)]
            assert "api.foreign_answer" in names
            summary = next(e for e in events(result.stderr) if e["event"] == "summary")
            assert (0, {}) == (summary["acked"], summary["dead_letters"])
        finally:
            gw.stop()

    @pytest.mark.slow
    def test_redis_input_keeps_every_record(self, tmp_path: Path) -> None:
        """The same on a Redis stream: every entry stays in the stream (acknowledged entries
        are deleted), the dead-letter stream stays empty; a later run against the healthy API
        applies them all."""
        name = f"cli_{uuid.uuid4().hex[:12]}"
        uri = f"{REDIS}?stream={name}&consumer=foreign&claim_idle_s=1"
        gw = Gateway("--known-count", "300", "--foreign-404-share", "1", "--foreign-after", "1")
        try:
            changes = stream(500, 300)
            data = b"".join(json.dumps(c).encode() + b"\n" for c in changes)
            enq = subprocess.run(
                [BIN, "enqueue", "--to", uri], input=data, capture_output=True, timeout=60
            )
            assert 0 == enq.returncode, enq.stderr
            env = worker_env(gw, tmp_path)
            del env["WORKER_DLQ"]
            result = run(["--source", uri], env)
            assert 1 == result.returncode, result.stderr
            assert "500" == redis_cli("XLEN", name)
            assert "0" == redis_cli("XLEN", f"{name}:dead")

            gw.configure(foreign_404_share=0.0)
            proc = subprocess.Popen(
                [BIN, "run", "--source", uri], env=env, stderr=subprocess.PIPE, text=True
            )
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and redis_cli("XLEN", name) != "0":
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=30)
            assert 0 == proc.returncode, stderr
            assert expected_state(changes) == gw.get("/_sim/contacts")
        finally:
            gw.stop()
            redis_cli("DEL", name, f"{name}:dead")
