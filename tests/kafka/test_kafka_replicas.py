"""Replicas of the ``kafka://`` input in one consumer group: they share the partitions, and a
kill -9 of one hands its partitions to the others with nothing lost and, per contact, no older
value applied after a newer one (checked at the simulator)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import anyio
import pytest

from tests.cli.test_cli import BIN, Gateway, WorkerProcess, worker_env
from tests.engine.harness import expected_state
from tests.engine.test_engine import applied_in_order, stream
from tests.kafka.conftest import Tansu, free_port
from tests.kafka.test_kafka_source import committed


def scrape(port: int) -> dict[str, float]:
    """The unlabelled samples of a replica's /metrics ({} while it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
    except (OSError, urllib.error.URLError):
        return {}
    samples: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.rpartition(" ")
            samples[name.split("contact_worker_")[-1]] = float(value)
    return samples


class Replica(WorkerProcess):
    """One `contact-worker run` process with its status port."""

    def __init__(self, uri: str, env: dict[str, str], log: Path) -> None:
        super().__init__(uri, env, log, stop_timeout_s=60.0)
        self.port = 0

    def start(self, **env: str) -> None:
        self.port = free_port()
        super().start(**env, WORKER_HTTP_PORT=str(self.port))

    def metric(self, name: str) -> float | None:
        return scrape(self.port).get(name)


def wait(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.slow
def test_three_replicas_one_killed(tmp_path: Path, tansu: Tansu, topic: str) -> None:
    """3 replicas on 6 partitions; one is kill -9ed with records in hand, restarted later, more
    changes come: every change is applied, per contact the sequence numbers never go back,
    every offset is committed, and SIGTERM stops every replica with 0."""
    partitions = 6
    uri = (
        f"kafka://{tansu.bootstrap}/{topic}?partitions={partitions}&poll_s=0.1&session_timeout_s=3"
    )
    gw = Gateway("--known-count", "300", "--latency", "uniform:30:90", "--record-history")
    replicas: list[Replica] = []
    try:
        env = worker_env(gw, tmp_path, WORKER_BATCH_SIZE="20", WORKER_CONCURRENCY="4")
        del env["WORKER_DLQ"]  # dead letters (none expected) to the topic's own
        init = subprocess.run([BIN, "init", "--to", uri], env=env, capture_output=True, timeout=60)
        assert 0 == init.returncode, init.stderr
        changes = stream(4000, 300, seed=44)
        replicas = [Replica(uri, env, tmp_path / f"r{i}.log") for i in (1, 2, 3)]
        for replica in replicas:
            replica.start()
        wait(
            lambda: [r.metric("input_partitions_held") for r in replicas] == [2.0, 2.0, 2.0],
            60,
            "the three replicas never shared the partitions 2 + 2 + 2",
        )
        for round_ in range(10):
            data = b"".join(
                json.dumps(c).encode() + b"\n" for c in changes[round_ * 400 : (round_ + 1) * 400]
            )
            producer = subprocess.Popen(
                [BIN, "enqueue", "--to", uri], stdin=subprocess.PIPE, env=env
            )
            assert producer.stdin is not None
            producer.stdin.write(data)
            producer.stdin.close()
            if round_ == 3:
                wait(
                    lambda: (replicas[1].metric("input_unacked_records") or 0) > 0,
                    20,
                    "r2 never had records in hand",
                )
                replicas[1].kill()  # with records read and not acknowledged
                wait(
                    lambda: (
                        [replicas[i].metric("input_partitions_held") for i in (0, 2)] == [3.0, 3.0]
                    ),
                    60,
                    "r1 and r3 never took r2's partitions over (3 + 3)",
                )
            if round_ == 5:
                replicas[1].start()
            assert 0 == producer.wait(60)
        want = expected_state(changes)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and gw.get("/_sim/contacts") != want:
            time.sleep(0.2)
        logs = {p.name: p.read_text()[-3000:] for p in tmp_path.glob("r*.log")}
        assert want == gw.get("/_sim/contacts"), (gw.get("/_sim/stats"), logs)
        assert applied_in_order(gw.get("/_sim/history"))
        codes = [replica.stop() for replica in replicas]
        assert [0, 0, 0] == codes, logs
        offsets = anyio.run(committed, tansu, topic, partitions)
        assert len(changes) == sum(offset or 0 for offset in offsets.values()), offsets
    finally:
        for replica in replicas:
            if replica.proc is not None and replica.proc.poll() is None:
                replica.proc.kill()
                replica.proc.wait(10)
        gw.stop()
