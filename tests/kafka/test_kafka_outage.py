"""The brokers go away and come back while `contact-worker run` reads a ``kafka://`` input:
it reports the input unavailable, reconnects on its own, and loses nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import anyio
import pytest

from tests.cli.test_cli import BIN, Gateway, worker_env
from tests.engine.harness import expected_state
from tests.engine.test_engine import applied_in_order, stream
from tests.kafka.conftest import Proxy, Tansu, free_port
from tests.kafka.test_kafka_replicas import Replica
from tests.kafka.test_kafka_source import committed

T = TypeVar("T")


async def blocking(call: Callable[..., T], *args: object) -> T:
    """A blocking call in a thread: the proxy runs on this event loop."""
    return await anyio.to_thread.run_sync(call, *args)


async def until(check: Callable[[], bool], interval_s: float = 0.1) -> None:
    """Poll a blocking check (in a thread) until it holds."""
    while True:
        if await blocking(check):
            return
        await anyio.sleep(interval_s)


@pytest.mark.slow
def test_broker_outage_and_comeback(tmp_path: Path, topic: str) -> None:
    """Mid-run, every connection to the broker is cut and the port refuses for longer than the
    group's session: /metrics says the input is unavailable; once the broker is back, the
    worker rejoins, every change is applied in order, and every offset is committed."""
    proxy_port = free_port()
    broker = Tansu(tmp_path / "tansu.log", advertised=proxy_port)
    broker.start()
    proxy = Proxy(proxy_port, broker.port)
    gw = Gateway("--known-count", "200", "--latency", "uniform:20:60", "--record-history")
    worker: Replica | None = None

    async def scenario() -> None:
        nonlocal worker
        await proxy.start()
        uri = f"kafka://127.0.0.1:{proxy_port}/{topic}?partitions=2&poll_s=0.1&session_timeout_s=2"
        env = worker_env(gw, tmp_path, WORKER_BATCH_SIZE="10", WORKER_CONCURRENCY="2")
        done = await anyio.run_process([BIN, "init", "--to", uri], env=env, check=False)
        assert 0 == done.returncode, done.stderr
        changes = stream(2000, 200, seed=9)
        data = b"".join(json.dumps(c).encode() + b"\n" for c in changes)
        done = await anyio.run_process(
            [BIN, "enqueue", "--to", uri], input=data, env=env, check=False
        )
        assert 0 == done.returncode, done.stderr
        worker = Replica(uri, env, tmp_path / "worker.log")
        worker.start()
        with anyio.fail_after(60):
            await until(lambda: gw.get("/_sim/stats").get("requests", 0) >= 5)
        await proxy.cut()
        with anyio.fail_after(30):
            await until(lambda: worker.metric("input_available") == 0.0)
        await anyio.sleep(3)  # past the session timeout: the group forgets the member
        await proxy.start()
        want = expected_state(changes)
        with anyio.fail_after(90):
            await until(lambda: gw.get("/_sim/contacts") == want)
            await until(lambda: worker.metric("input_available") == 1.0)
        assert applied_in_order(await blocking(gw.get, "/_sim/history"))
        reconnects = await blocking(worker.metric, "input_reconnects_total")
        assert 0 == await blocking(worker.stop), worker.log.read_text()[-3000:]
        offsets = await committed(broker, topic, 2)
        assert len(changes) == sum(offset or 0 for offset in offsets.values()), offsets
        assert (reconnects or 0) >= 1

    async def scenario_then_cut() -> None:
        try:
            await scenario()
        finally:
            await proxy.cut()

    try:
        anyio.run(scenario_then_cut)
    finally:
        if worker is not None and worker.proc is not None and worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait(10)
        gw.stop()
        broker.stop()
