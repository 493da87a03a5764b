"""The status port and the logs of a real `contact-worker run` process, as an operator sees them."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli.test_cli import BIN, Gateway, events, run, worker_env
from tests.engine.harness import write_lines
from tests.engine.test_engine import stream
from tests.engine.test_status import FAMILIES, PROGRESS_KEYS, Samples, labelled, parse


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get(url: str) -> tuple[int, bytes]:
    """Status and body of a GET; (0, b"") while nothing listens yet."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (ConnectionError, urllib.error.URLError):
        return 0, b""


class Worker:
    """A `contact-worker run --follow` process with its status port."""

    def __init__(self, gw: Gateway, tmp_path: Path, *args: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [BIN, "run", "--source", f"jsonl:{tmp_path / 'in.jsonl'}", "--follow", *args],
            env=worker_env(gw, tmp_path, WORKER_HTTP_PORT=str(self.port)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def metrics(self) -> tuple[dict[str, str], Samples] | None:
        """/metrics parsed; None before the port is served."""
        status, body = get(self.base + "/metrics")
        if status == 0:
            assert self.proc.poll() is None, self.proc.communicate()[1]
            return None
        assert 200 == status
        return parse(body.decode())

    def wait_for(self, done: Any) -> tuple[dict[str, str], Samples]:
        """Scrape until ``done(samples)`` holds (the test's timeout bounds the wait)."""
        while True:
            scraped = self.metrics()
            if scraped is not None and done(scraped[1]):
                return scraped

    def stop(self) -> tuple[int, str]:
        """SIGTERM, then the exit code and the log."""
        self.proc.send_signal(signal.SIGTERM)
        return self.wait()

    def wait(self) -> tuple[int, str]:
        """The exit code and the log, once the process ends."""
        _, stderr = self.proc.communicate(timeout=60)
        return self.proc.returncode, stderr

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *_: object) -> None:
        if self.proc.poll() is None:  # a failed test: leave no process behind
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def slow_gateway() -> Iterator[Gateway]:
    gw = Gateway("--known-count", "300", "--latency", "100")
    yield gw
    gw.stop()


def distinct(n: int) -> list[dict[str, Any]]:
    """One change to each of IDs 1..n: nothing coalesces, every request is full."""
    return [{"ID": i, "lastname": f"L{i}"} for i in range(1, n + 1)]


def value(samples: Samples, name: str) -> float:
    return samples.get((name, ()), -1.0)


class TestMetricsDuringARun:
    @pytest.mark.slow
    def test_every_family_scraped_mid_run_and_consistent_at_the_end(
        self, slow_gateway: Gateway, tmp_path: Path
    ) -> None:
        """Scraped while requests are still in flight, /metrics has every documented family
        with its type; once everything is acknowledged its counters match the API's."""
        write_lines(tmp_path / "in.jsonl", distinct(300))
        with Worker(slow_gateway, tmp_path, "--batch-size", "10", "--concurrency", "2") as worker:
            types, mid = worker.wait_for(
                lambda s: value(s, "contact_worker_in_flight_requests") > 0
            )
            assert FAMILIES == {n: t for n, t in types.items() if n in FAMILIES}
            assert 1 == value(mid, "contact_worker_ready")
            assert value(mid, "contact_worker_changes_acked_total") < 300
            _, end = worker.wait_for(
                lambda s: (
                    value(s, "contact_worker_changes_acked_total") == 300
                    and value(s, "contact_worker_in_flight_requests") == 0
                )
            )
            sim = slow_gateway.get("/_sim/stats")
            assert sim["contacts_applied"] == value(end, "contact_worker_contacts_applied_total")
            assert 300 == value(end, "contact_worker_contacts_applied_total")
            requests = labelled(end, "contact_worker_requests_total", "status")
            assert {"204": sim["by_status"]["204"]} == requests
            assert 30 == value(end, "contact_worker_request_duration_seconds_count")
            assert 300 == value(end, "contact_worker_batch_size_contacts_sum")
            assert 300 == value(end, "contact_worker_change_ack_latency_seconds_count")
            # With 100 ms of API latency, no change was acknowledged sooner.
            fast = ("contact_worker_change_ack_latency_seconds_bucket", (("le", "0.05"),))
            assert 0 == end[fast]
            assert (2, 10) == (
                value(end, "contact_worker_concurrency_limit"),
                value(end, "contact_worker_batch_size_limit"),
            )
            code, stderr = worker.stop()
            assert 0 == code, stderr

    @pytest.mark.slow
    def test_readyz_draining_while_slow_requests_finish(self, tmp_path: Path) -> None:
        """After SIGTERM, /readyz answers 503 "draining" while the last requests (0.5 s each)
        finish; then the worker exits 0 with every change applied."""
        gw = Gateway("--known-count", "30", "--latency", "500")
        try:
            write_lines(tmp_path / "in.jsonl", distinct(30))
            with Worker(gw, tmp_path, "--batch-size", "10", "--concurrency", "1") as worker:
                worker.wait_for(
                    lambda s: (
                        value(s, "contact_worker_in_flight_requests") == 1
                        and value(s, "contact_worker_waiting_changes") > 0
                    )
                )
                assert 200 == get(worker.base + "/readyz")[0]
                worker.proc.send_signal(signal.SIGTERM)
                while True:
                    status, body = get(worker.base + "/readyz")
                    assert status != 0, "exited before /readyz turned 503"
                    if status == 503:
                        break
                assert {"ready": False, "reason": "draining"} == json.loads(body)
                assert 200 == get(worker.base + "/healthz")[0]
                code, stderr = worker.wait()
                assert 0 == code, stderr
            assert 30 == gw.get("/_sim/stats")["contacts_applied"]
        finally:
            gw.stop()

    @pytest.mark.slow
    def test_second_signal_while_draining_stops_at_once(self, tmp_path: Path) -> None:
        """A second SIGTERM during the drain stops without waiting for the requests left:
        a clean exit 0 (nothing more acknowledged), not death by the signal."""
        gw = Gateway("--known-count", "30", "--latency", "500")
        try:
            write_lines(tmp_path / "in.jsonl", distinct(30))
            with Worker(gw, tmp_path, "--batch-size", "10", "--concurrency", "1") as worker:
                worker.wait_for(
                    lambda s: (
                        value(s, "contact_worker_in_flight_requests") == 1
                        and value(s, "contact_worker_waiting_changes") > 0
                    )
                )
                worker.proc.send_signal(signal.SIGTERM)
                while get(worker.base + "/readyz")[0] != 503:
                    assert worker.proc.poll() is None, "exited before /readyz turned 503"
                code, stderr = worker.stop()
            assert 0 == code, stderr
            logged = events(stderr)
            assert "second signal: stopping without draining" in [e["event"] for e in logged]
            done = next(e for e in logged if e["event"] == "summary")
            assert "shutdown_timeout" == done["ending"]
            assert done["acked"] < 30
        finally:
            gw.stop()


class TestLogs:
    @pytest.mark.slow
    def test_progress_events_in_json_logs(self, tmp_path: Path) -> None:
        """`--progress-interval 0.2` logs `progress` events at info with the documented keys."""
        gw = Gateway("--known-count", "200", "--latency", "50")
        try:
            write_lines(tmp_path / "in.jsonl", distinct(200))
            result = run(
                ["--source", f"jsonl:{tmp_path / 'in.jsonl'}", "--progress-interval", "0.2"],
                worker_env(gw, tmp_path, WORKER_BATCH_SIZE="10", WORKER_CONCURRENCY="1"),
            )
        finally:
            gw.stop()
        assert 0 == result.returncode, result.stderr
        progress = [e for e in events(result.stderr) if e["event"] == "progress"]
        assert progress
        for event in progress:
            assert PROGRESS_KEYS | {"event", "level", "timestamp"} == event.keys()
            assert "info" == event["level"]

    def test_debug_events_of_a_send_carry_batch_and_request(self, tmp_path: Path) -> None:
        """At debug level each request logs a `batch` event; it and every other event of that
        send (here the dead letters its 404 led to) carry `batch` and `request`."""
        gw = Gateway("--known-count", "50", "--latency", "2")
        try:
            write_lines(tmp_path / "in.jsonl", stream(300, 50, unknown=frozenset({901})))
            result = run(
                ["--source", f"jsonl:{tmp_path / 'in.jsonl'}", "--log-level", "debug"],
                worker_env(gw, tmp_path, WORKER_PROGRESS_INTERVAL="0"),
            )
        finally:
            gw.stop()
        assert 0 == result.returncode, result.stderr
        logged = events(result.stderr)
        batches = [e for e in logged if e["event"] == "batch"]
        assert batches and all("request" in e for e in batches)
        assert len(batches) == len({e["request"] for e in batches})
        dead = [e for e in logged if e["event"] == "dead letter"]
        assert dead
        by_request = {e["request"]: e["batch"] for e in batches}
        assert all(by_request[e["request"]] == e["batch"] for e in dead)
        assert [] == [e for e in logged if e["event"] == "progress"]
